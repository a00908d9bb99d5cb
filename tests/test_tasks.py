"""Synthetic ICL tasks: induction head, label mapping, mixtures, and what every task shares
(episode format, determinism, disjoint train / held-out streams, batches)."""

import pytest
import torch

from lit_icl.data import (
    AssociativeRecallDataModule,
    InductionHeadDataModule,
    LabelMappingDataModule,
    MixtureDataModule,
    SyntheticICLDataModule,
)
from lit_icl.data.induction import TRIGGER
from lit_icl.data.label_mapping import ARROW, DELIMITER
from lit_icl.data.synthetic import HELDOUT, TEST, TRAIN, VAL, stream_generator

SMALL = dict(num_train=128, num_val=32, num_heldout=24, batch_size=8)


def recall():
    return AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, n_queries=2, **SMALL)


def induction():
    return InductionHeadDataModule(n_segments=4, segment_len=5, n_tokens=10, **SMALL)


def label_mapping():
    return LabelMappingDataModule(n_pairs=4, n_words=12, n_labels=3, n_queries=2, **SMALL)


def mixture():
    return MixtureDataModule([recall(), induction(), label_mapping()], weights=[1, 2, 1], **SMALL)


TASKS = [recall, induction, label_mapping, mixture]


def same(a, b) -> bool:
    return all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(vars(a).values(), vars(b).values()))


@pytest.mark.parametrize("make", TASKS, ids=lambda f: f.__name__)
def test_every_task_shares_the_format(make):
    dm = make()
    assert isinstance(dm, SyntheticICLDataModule)
    x, y = dm.sequences(40, TRAIN)
    assert x.shape == y.shape == (40, dm.seq_len) and x.dtype == y.dtype == torch.long
    assert 0 <= int(x.min()) and int(x.max()) < dm.vocab_size
    assert (y != -100).any(dim=1).all(), "every sequence trains something"
    for task in dm.heldout_tasks():
        for k in (0, 1, dm.max_shots):
            ep = dm.heldout_episodes(k, task=task)
            assert len(ep) == 24 and ep.demo_ids.shape[1] == ep.shot_index.shape[1]
            assert torch.isin(ep.answers, ep.candidates).all()
            assert int(ep.prompts.max()) < dm.vocab_size
            if k:
                assert ep.shot_index.max() == k - 1 and (ep.shot_index >= 0).all()
            assert ep.prompts.shape[1] <= dm.seq_len, "held-out prompts fit the trained length"
        assert same(dm.heldout_episodes(2, task=task), make().heldout_episodes(2, task=task)), "deterministic"
    assert same(dm.heldout_episodes(2), dm.heldout_episodes(2, task=dm.heldout_tasks()[0]))
    with pytest.raises(ValueError, match="heldout_episodes: n_shots"):
        dm.heldout_episodes(dm.max_shots + 1)
    with pytest.raises(ValueError, match="task='nope'"):
        dm.heldout_episodes(1, task="nope")


@pytest.mark.parametrize("make", TASKS, ids=lambda f: f.__name__)
def test_streams_are_deterministic_and_disjoint(make):
    dm, again = make(), make()
    for stream in (TRAIN, VAL, TEST):
        assert all(torch.equal(a, b) for a, b in zip(dm.sequences(30, stream), again.sequences(30, stream)))
    assert not torch.equal(dm.sequences(30, TRAIN)[0], dm.sequences(30, VAL)[0])
    # held-out prompts never occur as a prefix of a training sequence
    train = {tuple(row) for row in dm.sequences(dm.num_train, TRAIN)[0].tolist()}
    ep = dm.heldout_episodes(dm.max_shots, task=dm.heldout_tasks()[-1])
    for prompt in ep.prompts.tolist():
        assert not any(row[: len(prompt)] == tuple(prompt) for row in train)


def test_stream_generators_differ_per_stream_and_seed():
    seeds = {stream_generator(s, t).initial_seed() for s in (1, 2) for t in (TRAIN, VAL, HELDOUT, TEST)}
    assert len(seeds) == 8
    assert stream_generator(1, 2, 3).initial_seed() != stream_generator(1, 2, 4).initial_seed()


def test_batches_are_dicts_of_the_fixed_splits():
    dm = induction()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (8, dm.seq_len)
    val = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
    assert torch.equal(val, dm.sequences(32, VAL)[0])


def test_induction_labels_every_repeated_trigger():
    dm = induction()
    x, y = dm.sequences(50, TRAIN)
    assert (x[:, -1] == TRIGGER).all(), "the trigger closes every sequence"
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        triggers = [t for t, tok in enumerate(row_x) if tok == TRIGGER]
        assert len(triggers) == dm.n_segments + 1
        target = row_x[triggers[0] + 1]
        assert all(row_x[t + 1] == target for t in triggers[:-1])
        assert [t for t, lab in enumerate(row_y) if lab != -100] == triggers[1:]
        assert all(row_y[t] == target for t in triggers[1:])


def test_induction_episodes_hold_the_answer_after_each_trigger():
    dm = induction()
    ep = dm.heldout_episodes(3)
    assert ep.demo_ids.shape == (24, 15) and ep.query_ids.tolist() == [[TRIGGER]] * 24
    assert torch.equal(ep.candidates, torch.arange(2, 12))
    for demo, answer in zip(ep.demo_ids.tolist(), ep.answers.tolist()):
        after = [demo[t + 1] for t, tok in enumerate(demo) if tok == TRIGGER]
        assert after == [answer] * 3
    assert torch.equal(dm.heldout_episodes(4).demo_ids[:, :15], ep.demo_ids), "more shots extend the same episodes"
    assert dm.heldout_episodes(0).demo_ids.shape == (24, 0)


def test_label_mapping_layout_and_episodes():
    dm = label_mapping()
    assert dm.vocab_size == 3 + 3 + 12 and torch.equal(dm.value_ids, torch.tensor([3, 4, 5]))
    x, y = dm.sequences(60, TRAIN)
    slots = x.view(60, -1, 4)
    assert (slots[..., 1] == ARROW).all() and (slots[..., 3] == DELIMITER).all()
    assert torch.isin(slots[..., 2], dm.value_ids).all() and (slots[..., 0] >= 6).all()
    labelled = y != -100
    assert not labelled[:, 0::4].any() and not labelled[:, 2::4].any() and not labelled[:, 3::4].any()
    assert torch.equal(y[labelled], x[:, 2::4][labelled[:, 1::4]]), "the label at the arrow is the shown y"
    ep = dm.heldout_episodes(4)
    assert ep.query_ids.shape == (24, 2) and (ep.query_ids[:, 1] == ARROW).all()
    for demo, (word, _), answer in zip(ep.demo_ids.tolist(), ep.query_ids.tolist(), ep.answers.tolist()):
        shown = {demo[i]: demo[i + 2] for i in range(0, len(demo), 4)}
        assert len(shown) == 4 and shown[word] == answer
    assert torch.equal(ep.candidates, dm.value_ids)


def test_label_mapping_zero_shot_is_at_chance_by_construction():
    dm = LabelMappingDataModule(n_pairs=4, n_words=12, n_labels=4, n_queries=2, num_heldout=4000)
    ep = dm.heldout_episodes(0)
    always = (ep.answers == ep.candidates[0]).float().mean().item()  # any query-only rule does as well
    assert abs(always - 0.25) < 0.03
    counts = torch.bincount(ep.answers - 3, minlength=4).float() / 4000
    assert (counts - 0.25).abs().max() < 0.03


def test_mixture_weights_offsets_and_per_task_episodes():
    parts = [recall(), induction(), label_mapping()]
    dm = MixtureDataModule(parts, weights=[1, 2, 1], num_train=4000, num_val=32, num_heldout=24, batch_size=8)
    assert dm.heldout_tasks() == ["recall", "induction", "label_mapping"]
    assert dm.vocab_size == 1 + 16 + 11 + 17 and dm.offsets == [0, 16, 27]
    assert dm.seq_len == max(p.seq_len for p in parts) and dm.max_shots == 4
    which = dm.assignments(4000, TRAIN)
    share = torch.bincount(which, minlength=3).float() / 4000
    assert torch.allclose(share, torch.tensor([0.25, 0.5, 0.25]), atol=0.03)
    x, y = dm.sequences(4000, TRAIN)
    for i, part in enumerate(parts):  # each task's tokens in its own range, the rest padding
        rows = x[which == i]
        real = rows[:, : part.seq_len]
        assert ((real > dm.offsets[i]) & (real < dm.offsets[i] + part.vocab_size)).all()
        assert (rows[:, part.seq_len:] == 0).all() and (y[which == i][:, part.seq_len:] == -100).all()
        first = part.sequences(int((which == i).sum()), TRAIN)[0]
        assert torch.equal(real - dm.offsets[i], first), "the task's own stream, shifted"
        ep, own = dm.heldout_episodes(3, task=dm.names[i]), part.heldout_episodes(3, 24)
        assert torch.equal(ep.prompts - dm.offsets[i], own.prompts) and torch.equal(ep.answers - dm.offsets[i], own.answers)
        assert torch.equal(ep.candidates - dm.offsets[i], own.candidates)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: InductionHeadDataModule(segment_len=1), "segment_len must be >= 2"),
        (lambda: LabelMappingDataModule(n_pairs=9, n_words=8), "n_pairs=9 exceeds n_words=8"),
        (lambda: LabelMappingDataModule(n_labels=0), "n_labels must be >= 1"),
        (lambda: MixtureDataModule([]), "non-empty list"),
        (lambda: MixtureDataModule([recall(), recall()]), "must be distinct"),
        (lambda: MixtureDataModule([recall(), induction()], weights=[1, -1]), "weights="),
        (lambda: MixtureDataModule([mixture()]), "cannot itself be a mixture"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_mixture_names_tell_equal_tasks_apart():
    dm = MixtureDataModule([recall(), recall()], names=["a", "b"])
    assert dm.heldout_tasks() == ["a", "b"]
    assert not torch.equal(dm.heldout_episodes(2, task="a").prompts, dm.heldout_episodes(2, task="b").prompts)
