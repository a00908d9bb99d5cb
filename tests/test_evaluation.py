"""lit_icl.evaluation: the comparison as a plain function. Open-vocabulary answers scored by
teacher-forced exact match against a greedy-decoding reference, the prompted pass's state against
the one-pass prompt for every attention kind, the shared zero-shot pass, the finetuning rate
chosen on held-out answer loss, ft_changed, and the callback on function-style template tasks."""
import json

import lightning.pytorch as pl
import pytest
import torch

from lit_icl.callbacks import ICLConversionCallback, format_summary
from lit_icl.data import AssociativeRecallDataModule, Episodes
from lit_icl.evaluation import EpisodeRuns, correct, evaluate, select_lr
from lit_icl.finetune import finetune
from lit_icl.metrics import answer_loss
from lit_icl.mixers import MIXERS
from lit_icl.module import LitTransformerLM
from tests.conftest import HYBRIDS, model_config, naive_greedy, setting_id, tiny_model

FT = dict(params="kv", lr=0.5, epochs=1)


def open_episodes(model, seed: int = 0, n: int = 6, wrong: set[int] = frozenset()) -> tuple[Episodes, list]:
    """Episodes of padded demonstrations and queries whose answers (1 to 3 tokens) are the model's
    own greedy continuation of the prompt, except in episodes `wrong` (last answer token changed)."""
    gen = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    demos = [[torch.randint(1, V, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
              for _ in range(2)] for _ in range(n)]
    queries = [torch.randint(1, V, (1 + i % 3,), generator=gen).tolist() for i in range(n)]
    answers = []
    for i in range(n):
        prompt = torch.tensor([[t for d in demos[i] for t in d] + queries[i]])
        tokens = naive_greedy(model, prompt, 1 + i % 3)[0].tolist()
        if i in wrong:
            tokens[-1] = (tokens[-1] + 1) % V
        answers.append(tokens)
    return Episodes.from_lists(demos, queries, [0] * n, [], answer_tokens=answers), answers


def test_exact_match_equals_greedy_decoding():
    """Teacher-forced exact match says "right" exactly where greedy decoding of the prompt
    produces the answer's tokens (naive_greedy, margin-checked: no near-tie decides it)."""
    model = tiny_model(momentum=0.5)
    eps, _ = open_episodes(model, wrong={1, 4})
    assert eps.open_vocabulary and eps.answer_mask is not None and eps.query_mask is not None
    runs = EpisodeRuns(model, eps, FT, check=True)
    assert runs.logits["prompted"].shape == (6, 3, model.config.vocab_size)
    assert correct(runs.logits["prompted"], eps).tolist() == [True, False, True, True, False, True]
    # zero-shot: the query alone, against greedy decoding of the query alone
    for i in range(len(eps)):
        q = eps.query_ids[i][eps.query_mask[i].bool()][None]
        A = int(eps.targets[1][i].sum())
        expect = naive_greedy(model, q, A)[0].tolist() == eps.answer_ids[i, :A].tolist()
        assert bool(correct(runs.logits["zero_shot"][i : i + 1], eps[i : i + 1])) == expect


@pytest.mark.parametrize("attention", [*MIXERS, *HYBRIDS], ids=setting_id)
def test_prompted_state_equals_the_one_pass_prompt(attention):
    """For every attention kind (momentum on, padded demonstrations, queries and answers): the
    prompted prediction, which continues the demonstrations' exact state, has the logits of the
    whole prompt in one pass at every answer position, to float64 rounding."""
    model = tiny_model(attention=attention, momentum=0.5, **({"window": 3} if attention == "sliding" else {}))
    eps, _ = open_episodes(model, seed=1)
    runs = EpisodeRuns(model, eps, FT, check=True)
    real = eps.targets[1]
    one, two = runs.one_pass[real], runs.logits["prompted"][real]
    assert float((one - two).norm() / one.norm()) < 1e-10
    # and the one pass itself is the model on the prompt + answer, by hand, row by row
    for i in range(len(eps)):
        A = int(real[i].sum())
        ids = torch.cat([eps.prompts[i][eps.prompt_mask[i].bool()], eps.answer_ids[i, : A - 1]])[None]
        torch.testing.assert_close(runs.one_pass[i, :A], model(ids)[0, -A:])  # real positions come first


def test_finetuned_open_vocabulary_equals_the_reference():
    model = tiny_model(momentum=0.3)
    eps, _ = open_episodes(model, seed=2, n=4)
    runs = EpisodeRuns(model, eps, FT)
    demos, mask = eps.demonstrations()
    inputs, imask = eps.query_inputs
    for i in range(len(eps)):
        tuned = finetune(model, demos[i], None if mask is None else mask[i], lr=0.5)
        A = int(eps.targets[1][i].sum())
        keep = inputs[i][imask[i].bool()][None]  # the row without its padding: query + A - 1 answer tokens
        assert keep.shape[1] == int(eps.query_mask[i].sum()) + A - 1
        torch.testing.assert_close(runs.logits["finetuned"][i, :A], tuned(keep)[0, -A:])


def test_shared_zero_shot_gives_the_same_metrics(tmp_path):
    from lit_icl.data import TemplateDataModule

    templates, tokenizer = write_function_tasks(tmp_path)
    dm = TemplateDataModule(templates=templates, tokenizer=tokenizer, num_heldout=8, cache_dir=str(tmp_path / "c"))
    model = tiny_model(vocab_size=dm.vocab_size, momentum=0.3)
    episodes = {k: dm.heldout_episodes(k) for k in (0, 1, 3)}
    assert episodes[1].query_inputs[0].equal(episodes[3].query_inputs[0]), "the same queries at every shot count"
    shared, alone = {}, {}
    a = evaluate(model, episodes, finetune=FT, batch_size=5, seconds=shared)
    b = evaluate(model, episodes, finetune=FT, batch_size=5, seconds=alone, share_zero_shot=False)
    assert json.dumps(a) == json.dumps(b)  # NaN (an undefined Rec2FTP) equal to NaN too
    assert shared["zero_shot"] < alone["zero_shot"]  # two groups of queries run once instead of three times


def test_select_lr_takes_the_lowest_answer_loss():
    model = tiny_model(momentum=0.3)
    eps, _ = open_episodes(model, seed=3, n=4)
    grid = [1e-6, 0.3, 3.0]
    lr, losses = select_lr(model, eps, grid, FT, batch_size=3)
    assert set(losses) == set(grid) and lr == min(grid, key=losses.get)
    assert len(set(losses.values())) == 3, "the rates give different losses: no tie to break"
    # the reported loss is the finetuned copies' mean answer loss, by hand for the chosen rate
    demos, mask = eps.demonstrations()
    inputs, imask = eps.query_inputs
    by_hand = []
    for i in range(len(eps)):
        tuned = finetune(model, demos[i], None if mask is None else mask[i], lr=lr)
        logits = tuned(inputs[i : i + 1], attention_mask=None if imask is None else imask[i : i + 1])
        targets, real = eps.targets
        by_hand.append(float(answer_loss(logits[:, -targets.shape[1]:], targets[i : i + 1], real[i : i + 1])))
    assert losses[lr] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-9)


def test_ft_changed_and_the_summary_in_words():
    model = tiny_model(momentum=0.3)
    eps, _ = open_episodes(model, seed=4, n=6)
    still = evaluate(model, {2: eps}, finetune=dict(FT, lr=1e-12))[2]
    moved = evaluate(model, {2: eps}, finetune=dict(FT, lr=30.0))[2]
    assert still["ft_changed"] == 0.0 and still["finetuned_acc"] == still["zero_shot_acc"]
    assert moved["ft_changed"] > 0.0
    assert "changed no prediction" in format_summary({2: still}, open_vocabulary=True)
    assert f"changed {100 * moved['ft_changed']:.1f}% of the predictions" in format_summary({2: moved}, True)
    assert "exact match" in format_summary({2: moved}, True)


def test_evaluate_names_the_only_task():
    """A DataModule of one task keyed its episodes by "": evaluate(task=<its name>) returned {}
    (reproduce.py icl-vs-ft --tasks mr stopped with a KeyError)."""
    dm = AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, n_queries=2, num_train=32, num_val=8,
                                     num_heldout=6, batch_size=4)
    (task,) = dm.heldout_tasks()
    model = LitTransformerLM(model_config(dm.vocab_size, block_size=32)).model
    cb = ICLConversionCallback(shots=[0, 2], batch_size=4)
    cb.prepare(dm, block_size=32)
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    assert set(cb.evaluate(trainer, model, task=task)) == {0, 2}
    assert cb.evaluate(trainer, model)[2] == cb.evaluate(trainer, model, task=task)[2]
    with pytest.raises(ValueError, match="task='nope'; evaluated: \\['recall'\\]"):
        cb.evaluate(trainer, model, task="nope")


def write_function_tasks(root) -> tuple[list[dict], str]:
    """Two toy open-vocabulary tasks (upper: word -> WORD, first: word -> its first letter) in the
    functions source's layout, and a BPE tokenizer.json trained on them."""
    from lit_icl.data.tokenizer import save_tokenizer, train_bpe

    words = ["apple", "river", "stone", "cloud", "green", "light", "table", "music", "bread", "chair", "dream",
             "field", "grass", "house", "lemon", "night", "ocean", "paper", "queen", "sugar"]
    tasks = []
    for name, fn in (("upper", str.upper), ("first", lambda w: w[0])):
        folder = root / name
        folder.mkdir(parents=True)
        for split, part in (("train", words[:12]), ("validation", words[12:])):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps({"input": w, "output": fn(w)}) + "\n" for w in part))
        tasks.append(dict(name=name, source=str(folder), text_field="input", label_field="output", verbalizer={},
                          template="{text} -> {label}\n"))
    text = [f"{w} -> {w.upper()}\n{w} -> {w[0]}\n" for w in words]
    save_tokenizer(train_bpe(text * 5, vocab_size=300), str(root / "tokenizer.json"))
    return tasks, str(root / "tokenizer.json")


def test_callback_on_function_tasks_with_a_rate_grid(tmp_path):
    """lit-icl validate's path on open-vocabulary template tasks: a subset of the tasks, the
    finetuning rate chosen from a grid, ft_changed and finetune_lr logged per task."""
    from lit_icl.data import TemplateDataModule

    templates, tokenizer = write_function_tasks(tmp_path)
    dm = TemplateDataModule(templates=templates, tokenizer=tokenizer, num_heldout=4, batch_size=4, block_size=32,
                            cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(0)
    module = LitTransformerLM(model_config(dm.vocab_size, block_size=64))
    cb = ICLConversionCallback(shots=[0, 2], batch_size=4, finetune_lr=[0.01, 0.1], select_episodes=2, tasks=["upper"],
                               approximate_modes=[])
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1,
                         enable_model_summary=False, callbacks=[cb])
    trainer.validate(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert set(cb.task_results) == {"upper"} and cb.episodes[("upper", 2)].open_vocabulary
    assert float(metrics["icl/upper/finetune_lr/k=2"]) in (pytest.approx(0.01), pytest.approx(0.1))  # logged as float32
    assert 0.0 <= float(metrics["icl/upper/ft_changed/k=2"]) <= 1.0
    assert float(metrics["icl/upper/rel_logit_err/k=2"]) < 1e-5
    assert not any(name.startswith("icl/first/") for name in metrics)
    assert len(cb.select[("upper", 2)]) == 2 and not cb.select.get(("upper", 0)) and cb.repeats == {}
    # 8 validation words: 7 evaluated + 2 choosing the rate must repeat a query, and it is said
    many = ICLConversionCallback(shots=[2], num_episodes=7, finetune_lr=[0.01, 0.1], select_episodes=2)
    many.prepare(dm, block_size=64)
    assert many.repeats == {"upper": 1, "first": 1}
    with pytest.raises(ValueError, match=r"tasks=\['nope'\]: \['nope'\] not offered by TemplateDataModule"):
        ICLConversionCallback(tasks=["nope"]).prepare(dm, block_size=64)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="finetune_lr"):
        ICLConversionCallback(finetune_lr=[])
    with pytest.raises(ValueError, match="finetune_lr"):
        ICLConversionCallback(finetune_lr=[0.1, -1.0])
    with pytest.raises(ValueError, match="tasks='mr'"):
        ICLConversionCallback(tasks="mr")
    with pytest.raises(ValueError, match="lr_grid needs select"):
        evaluate(tiny_model(), {}, lr_grid=[0.1])


def test_open_vocabulary_episodes_are_checked_and_carried():
    eps = Episodes.from_lists([[[1, 2]], [[3]]], [[4], [5, 6]], [0, 0], [], answer_tokens=[[7, 8], [9]])
    assert eps.answers.tolist() == [7, 9] and eps.answer_mask.tolist() == [[1, 1], [1, 0]]
    inputs, mask = eps.query_inputs  # the query, then all answer tokens but the last
    assert inputs.tolist() == [[0, 4, 7], [5, 6, 9]] and mask.tolist() == [[0, 1, 1], [1, 1, 0]]
    assert eps.prompt_lengths.tolist() == [4, 3]
    assert eps[1:].answer_ids.tolist() == [[9, 0]] and eps.shard(0, 2).equals(eps[0:1])
    fitted, dropped = Episodes.from_lists([[[1, 2, 3], [4]]], [[5]], [0], [], answer_tokens=[[6, 7]]).drop_longest(4)
    assert dropped == 1 and fitted.answer_ids.tolist() == [[6, 7]] and fitted.prompt_lengths.tolist() == [3]
    with pytest.raises(ValueError, match="one non-empty answer per episode"):
        Episodes.from_lists([[[1]]], [[2]], [0], [], answer_tokens=[[]])
    with pytest.raises(ValueError, match="answer_mask must match answer_ids"):
        Episodes(eps.demo_ids, eps.query_ids, eps.answers, eps.candidates, eps.shot_index, eps.query_mask,
                 eps.answer_ids, torch.tensor([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="first tokens of Episodes.answer_ids"):
        Episodes(eps.demo_ids, eps.query_ids, torch.tensor([1, 1]), eps.candidates, eps.shot_index, eps.query_mask,
                 eps.answer_ids, eps.answer_mask)


def test_an_unchecked_conversion_reads_nan_not_zero():
    """check_batches=0: nothing compared the state with the one-pass prompt, so the exact
    conversion error is NaN (not 0, which would read as exact); old rows and NaN print sanely."""
    model = tiny_model(momentum=0.3)
    eps, _ = open_episodes(model, seed=5, n=4)
    row = evaluate(model, {2: eps}, finetune=FT, check_batches=0)[2]
    assert row["max_abs_logit_diff"] != row["max_abs_logit_diff"] and row["rel_logit_err"] != row["rel_logit_err"]
    checked = evaluate(model, {2: eps}, finetune=FT, check_batches=1)[2]
    assert 0.0 <= checked["rel_logit_err"] < 1e-10
    old = {k: v for k, v in checked.items() if k != "ft_changed"}  # a row from before ft_changed existed
    assert "FT changed" not in format_summary({0: old, 2: old}) and "changed" not in format_summary({2: old})
    assert "finetuning" not in format_summary({2: dict(checked, ft_changed=float("nan"))}).split("\n")[-1]
