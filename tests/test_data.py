"""Associative-recall data: layout, labels, determinism, held-out episodes, sharding, errors."""

import pytest
import torch

from lit_icl.data import AssociativeRecallDataModule, Episodes
from lit_icl.data.synthetic import HELDOUT, TEST, TRAIN, VAL, stream_generator


def test_sequence_layout(tiny_data):
    x, y = tiny_data.sequences(200, TRAIN)
    assert x.shape == y.shape == (200, tiny_data.seq_len) == (200, 2 * (4 + 4))
    assert x.dtype == y.dtype == torch.long
    keys, values = x[:, 0::2], x[:, 1::2]
    assert ((1 <= keys) & (keys <= tiny_data.n_keys)).all()
    assert torch.isin(values, tiny_data.value_ids).all()
    assert tiny_data.vocab_size == 1 + 8 + 8


def test_labels_are_recall_of_the_shown_map(tiny_data):
    x, y = tiny_data.sequences(300, TRAIN)
    assert (y[:, 1::2] == -100).all(), "labels only at key positions (the next token is a value)"
    shots = []
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        labelled = [t for t in range(0, len(row_y), 2) if row_y[t] != -100]
        k = labelled[0] // 2  # the first k slots show the map, every later slot is a query
        assert labelled == list(range(2 * k, len(row_y), 2))
        shown = {row_x[2 * s]: row_x[2 * s + 1] for s in range(k)}
        assert len(shown) == k, "the keys of a map are distinct"
        for t in labelled:
            assert row_x[t] in shown and row_y[t] == shown[row_x[t]] == row_x[t + 1]
        shots.append(k)
    assert set(shots) == set(range(1, tiny_data.n_pairs + 1)), "every shot count is trained"


def test_deterministic_and_streams_differ(tiny_data):
    again = AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, n_queries=4)
    for stream in (TRAIN, VAL):
        assert all(torch.equal(a, b) for a, b in zip(tiny_data.sequences(50, stream), again.sequences(50, stream)))
    assert not torch.equal(tiny_data.sequences(50, TRAIN)[0], tiny_data.sequences(50, VAL)[0])
    other = AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, n_queries=4, seed=7)
    assert not torch.equal(tiny_data.sequences(50, TRAIN)[0], other.sequences(50, TRAIN)[0])
    seeds = {stream_generator(1234, s).initial_seed() for s in (TRAIN, VAL, HELDOUT, TEST)}
    assert len(seeds) == 4, "train / val / held-out / test use distinct generator seeds"


def test_dataloaders_yield_dict_batches(tiny_data):
    tiny_data.setup("fit")
    assert tiny_data.train_dataloader().size == 256 and len(tiny_data.train_dataloader()) == 16
    for loader in (tiny_data.train_dataloader(), tiny_data.val_dataloader(), tiny_data.test_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "labels"}
        assert batch["input_ids"].shape == batch["labels"].shape == (16, tiny_data.seq_len)
    val = torch.cat([b["input_ids"] for b in tiny_data.val_dataloader()])
    assert torch.equal(val, tiny_data.sequences(64, VAL)[0]), "validation is the fixed VAL stream, in order"


def test_heldout_episodes(tiny_data):
    ep = tiny_data.heldout_episodes(n_shots=3)
    assert len(ep) == tiny_data.num_heldout == 32
    assert ep.demo_ids.shape == (32, 6) and ep.query_ids.shape == (32, 1) and ep.answers.shape == (32,)
    assert torch.equal(ep.candidates, tiny_data.value_ids)
    for demo, query, answer in zip(ep.demo_ids.tolist(), ep.query_ids[:, 0].tolist(), ep.answers.tolist()):
        shown = dict(zip(demo[0::2], demo[1::2]))
        assert len(shown) == 3 and shown[query] == answer
    same = tiny_data.heldout_episodes(n_shots=3)
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(vars(ep).values(), vars(same).values())), "identical every call"
    more = tiny_data.heldout_episodes(n_shots=4, num_episodes=32)
    assert torch.equal(more.demo_ids[:, :6], ep.demo_ids), "more shots extend the same maps"
    assert len(tiny_data.heldout_episodes(1, num_episodes=5)) == 5
    assert tiny_data.heldout_episodes(0).demo_ids.shape == (32, 0), "zero-shot: the query alone"


def test_heldout_maps_are_not_training_maps(tiny_data):
    ep = tiny_data.heldout_episodes(n_shots=4)
    x, _ = tiny_data.sequences(tiny_data.num_train, TRAIN)
    train_prefixes = {tuple(row) for row in x[:, :8].tolist()}
    assert not any(tuple(row) in train_prefixes for row in ep.demo_ids.tolist())


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shard_covers_every_episode_once(world_size):
    n = 11
    ep = Episodes(torch.arange(2 * n).view(n, 2), torch.arange(n).view(n, 1), torch.zeros(n, dtype=torch.long),
                  torch.tensor([0, 1]))
    shards = [ep.shard(rank, world_size) for rank in range(world_size)]
    seen = torch.cat([s.query_ids[:, 0] for s in shards]).sort().values
    assert torch.equal(seen, torch.arange(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for s in shards:
        assert torch.equal(s.demo_ids[:, 0], 2 * s.query_ids[:, 0]), "rows stay aligned"
        assert torch.equal(s.candidates, ep.candidates)
    assert len(ep.shard(0, 12)) + len(ep.shard(11, 12)) == 1, "more ranks than episodes: empty shards"
    with pytest.raises(ValueError, match="rank"):
        ep.shard(world_size, world_size)


def test_episodes_validation_and_to(tiny_data):
    ep = tiny_data.heldout_episodes(2, num_episodes=4)
    assert torch.equal(ep.to("cpu").prompts, torch.cat([ep.demo_ids, ep.query_ids], 1))
    with pytest.raises(ValueError, match=r"query_ids .*\(3, 1\)"):
        Episodes(ep.demo_ids, ep.query_ids[:3], ep.answers, ep.candidates)
    with pytest.raises(ValueError, match="answers must be a 1-D long"):
        Episodes(ep.demo_ids, ep.query_ids, ep.answers.float(), ep.candidates)
    with pytest.raises(ValueError, match="among Episodes.candidates"):
        Episodes(ep.demo_ids, ep.query_ids, ep.answers, torch.tensor([0]))
    with pytest.raises(ValueError, match="Q >= 1"):
        Episodes(ep.demo_ids, ep.query_ids[:, :0], ep.answers, ep.candidates)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_pairs=9, n_keys=8), "n_pairs=9 exceeds n_keys=8"),
        (dict(n_pairs=0), "n_pairs must be >= 1"),
        (dict(n_queries=0), "n_queries must be >= 1"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(num_workers=-1), "num_workers must be >= 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AssociativeRecallDataModule(**kwargs)


@pytest.mark.parametrize("n_shots, num", [(-1, None), (5, None), (2, 0)])
def test_bad_heldout_arguments_raise(tiny_data, n_shots, num):
    with pytest.raises(ValueError, match="heldout_episodes"):
        tiny_data.heldout_episodes(n_shots, num)
