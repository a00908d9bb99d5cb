"""The ICL-vs-finetuning comparison (Dai et al., 2023, "Why Can GPT Learn In-Context?", ACL
Findings) as a plain function: `evaluate(model, episodes)` returns, per shot count, the accuracy of
four predictions on the same queries and the metrics that compare them. No Trainer is needed;
`lit_icl.callbacks.ICLConversionCallback` schedules it during training and `scripts/` call it.

- zero_shot: the query alone (computed once per query set, shared by every shot count);
- prompted: the demonstrations, then the query (in-context learning);
- converted: the query alone on the model carrying the demonstrations' state (Chen et al., 2024):
  the exact conversion, and the approximate modes of softmax models (ICLAA);
- finetuned: the query alone on a copy finetuned on the demonstrations (`lit_icl.finetune`).

Answers. A label task (MR, BBC) predicts the argmax over its candidate label tokens at the
query's last position. An open-vocabulary task (a function task: "france ->" " Paris") predicts a
word of one or more tokens, scored by exact match: teacher-forced, every answer position's argmax
given the correct tokens before it is the correct token, which is what greedy decoding of the
answer's length gives, from one forward pass (what follows the answer is not checked). The similarity metrics (Rec2FTP, SimAOU, SimAM)
read the query's last token in both cases, as Dai et al. do for label words.

Cost. The prompted pass runs the demonstrations once, into the model's exact conversion state,
and the query (with its answer) on that state: the same arithmetic as one pass over the whole
prompt, and the exact converted prediction is that pass's. So that "converted equals prompted"
is not circular, the first `check_batches` groups of every shot count (of each rank's share)
also run the whole prompt in one pass, and the difference of its logits from the state's is the
conversion error logged (`max_abs_logit_diff`, `rel_logit_err`; NaN when nothing was checked). Approximate modes convert on their own and are compared
with the prompted logits of every episode.

Finetuning learning rate. With a grid (`lr_grid`), each shot count's rate is chosen on separate
held-out episodes (`select`) by the finetuned copies' mean loss on the answers, which breaks no
tie towards "nothing changed"; the chosen rate and the loss of each are reported. The untrained
baseline is finetuned at the rate chosen for the trained model.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from lit_icl.context import convert
from lit_icl.data.episodes import Episodes
from lit_icl.finetune import finetune_batched, finetuned_logits
from lit_icl.metrics import ConversionError, Rate, Rec2FTP, SimAM, SimAOU, answer_loss, exact_match, greedy, predict
from lit_icl.model import TransformerLM, evaluating

__all__ = ["Conversion", "EpisodeRuns", "ICLMetrics", "batches", "conversions", "correct", "evaluate", "measure",
           "prediction_names", "predictions", "random_updates", "select_lr", "untrained_model"]


class Conversion(NamedTuple):
    """One converted prediction: its name, the suffix of its error metrics ("" for the exact
    conversion, "_<mode>" for an approximate one) and its `convert` keyword arguments."""

    name: str
    suffix: str
    kwargs: dict


def conversions(model: TransformerLM, approximate: dict[str, dict] | None = None) -> list[Conversion]:
    """The exact conversion (the model's first mode: "converted", or "converted_<mode>" when
    that mode is not called "exact", e.g. converted_kv), then each approximate mode in
    `approximate` (mode -> convert kwargs) that the model supports."""
    exact = model.modes[0]
    out = [Conversion("converted" if exact == "exact" else f"converted_{exact}", "", {})]
    return out + [Conversion(f"converted_{m}", f"_{m}", kw) for m, kw in (approximate or {}).items() if m in model.modes]


def prediction_names(converted: Sequence[Conversion]) -> list[str]:
    """zero_shot, prompted, the exact conversion, finetuned, then the approximate conversions."""
    names = [c.name for c in converted]  # none for the untrained baseline, which converts nothing
    return ["zero_shot", "prompted", *names[:1], "finetuned", *names[1:]]


def predictions(logits: Tensor, episodes: Episodes) -> Tensor:
    """What a prediction says [N, A]: the chosen candidate token (A = 1) of a label task, the
    greedy answer tokens (-1 at padding) of an open-vocabulary one. logits [N, A, V]."""
    if not episodes.open_vocabulary:
        return predict(logits[:, 0], episodes.candidates)[:, None]
    return greedy(logits, episodes.targets[1])


def correct(logits: Tensor, episodes: Episodes) -> Tensor:
    """[N] bool: the prediction is the answer (candidate argmax, or exact match)."""
    if not episodes.open_vocabulary:
        return predict(logits[:, 0], episodes.candidates) == episodes.answers
    return exact_match(logits, *episodes.targets)


class EpisodeRuns:
    """The runs of the comparison on one group of episodes: for each prediction the logits at the
    answer positions [N, A, V] (A = 1 for a label task), and for zero_shot / prompted / finetuned
    the per-layer attention outputs at the query's last token [N, C] and its scores over the
    query's own tokens [N, H, Q]. `approximate` maps ICLAA modes to convert() keyword arguments
    (modes the model lacks are skipped). `zero_shot`: the `zero_shot_runs` of an earlier group
    with the same queries, reused. `check`: also run the whole prompt in one pass
    (`one_pass` holds its logits) to check the state the prompted prediction continues from.
    `seconds` holds the wall time of each phase (zero_shot, prompted, check, convert, finetune,
    finetuned)."""

    def __init__(self, model: TransformerLM, episodes: Episodes, finetune_kwargs: dict,
                 approximate: dict[str, dict] | None = None, convert_context: bool = True,
                 zero_shot: tuple | None = None, check: bool = False):
        converted = conversions(model, approximate) if convert_context else []
        self.seconds: dict[str, float] = {}
        self.one_pass: Tensor | None = None
        inputs, mask = episodes.query_inputs
        A, at = episodes.targets[0].shape[1], episodes.query_ids.shape[1] - 1
        self.logits, self.outputs, self.scores = {}, {}, {}
        if zero_shot is not None:
            self._keep("zero_shot", *zero_shot)
        else:
            with self.timed("zero_shot"):
                zs = model.run(inputs, attention_mask=mask, need_attn=True, logits_at=A, attn_at=at)
            self._keep("zero_shot", zs.logits, [a[:, at] for a in zs.attn_outputs], zs.attn_scores)
        if episodes.demo_ids.shape[1] == 0:  # no demonstrations: every prediction is the query alone
            for name in prediction_names(converted)[1:]:
                self._keep(name, self.logits["zero_shot"], self.outputs["zero_shot"], self.scores["zero_shot"])
            return
        with self.timed("prompted"):  # the demonstrations into the exact state, the query on it
            state = convert(model, episodes.demo_ids, attention_mask=episodes.demo_mask)
            pr = model.run(inputs, state=state, attention_mask=mask, need_attn=True, logits_at=A, attn_at=at)
        self._keep("prompted", pr.logits, [a[:, at] for a in pr.attn_outputs], pr.attn_scores)
        if converted:
            self.logits[converted[0].name] = pr.logits
        if check:
            with self.timed("check"):
                whole, whole_mask = episodes.teacher_forced_prompts
                self.one_pass = model.run(whole, attention_mask=whole_mask, logits_at=A).logits
        with self.timed("convert"):
            for name, _, kwargs in converted[1:]:
                state = convert(model, episodes.demo_ids, attention_mask=episodes.demo_mask, **kwargs)
                self.logits[name] = model.run(inputs, state=state, attention_mask=mask, logits_at=A).logits
        with self.timed("finetune"):
            weights = finetune_batched(model, *episodes.demonstrations(), **finetune_kwargs)
        with self.timed("finetuned"):
            logits, outputs, scores = finetuned_logits(model, weights, inputs, mask, need_attn=True, logits_at=A,
                                                       attn_at=at)
        self._keep("finetuned", logits, [a[:, at] for a in outputs], scores)

    @property
    def zero_shot_runs(self) -> tuple:
        """(logits, outputs, scores) of the zero-shot prediction, which depends on the query only."""
        return self.logits["zero_shot"], self.outputs["zero_shot"], self.scores["zero_shot"]

    def _keep(self, name: str, logits: Tensor, outputs: list[Tensor], scores: list[Tensor]) -> None:
        self.logits[name], self.outputs[name], self.scores[name] = logits, outputs, scores

    @contextlib.contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class ICLMetrics(torch.nn.Module):
    """Every metric of one shot count; `update` with an EpisodeRuns, `compute` to a dict. With
    `untrained`, `self.untrained` holds the same metrics (no conversions) for the runs of an
    untrained model, updated by the caller and computed with these under the suffix `_untrained`.
    `extra` holds figures that are not accumulated (the chosen finetuning rate)."""

    def __init__(self, n_layer: int, converted: Sequence[Conversion], untrained: bool = False):
        super().__init__()
        self.untrained = ICLMetrics(n_layer, []) if untrained else None
        self.names = prediction_names(converted)
        self.acc = torch.nn.ModuleDict({name: Rate() for name in self.names})
        self.errors = torch.nn.ModuleDict({c.name: ConversionError() for c in converted})
        self.suffixes = {c.name: c.suffix for c in converted}
        self.ft_changed = Rate()
        self.rec2ftp = Rec2FTP()
        self.simaou, self.simaou_random = SimAOU(n_layer), SimAOU(n_layer)
        self.simam_icl_ft, self.simam_icl_zsl = SimAM(n_layer), SimAM(n_layer)
        self.extra: dict[str, float] = {}

    def update(self, runs: EpisodeRuns, episodes: Episodes, random_updates: list[Tensor]) -> None:
        right = {name: correct(runs.logits[name], episodes) for name in self.names}
        for name in self.names:
            self.acc[name].update(right[name])
        real = episodes.targets[1]
        for name, error in self.errors.items():
            if self.suffixes[name]:  # an approximate mode: against the prompted logits
                error.update(runs.logits["prompted"][real], runs.logits[name][real])
            elif runs.one_pass is not None:  # the exact state: against the whole prompt in one pass
                error.update(runs.one_pass[real], runs.logits[name][real])
            elif episodes.demo_ids.shape[1] == 0:
                error.update(runs.logits["prompted"][real], runs.logits[name][real])
        zs_said, ft_said = (predictions(runs.logits[n], episodes) for n in ("zero_shot", "finetuned"))
        self.ft_changed.update((zs_said != ft_said).any(dim=1))
        self.rec2ftp.update(right["zero_shot"], right["finetuned"], right["prompted"])
        zs, icl, ft = (runs.outputs[n] for n in ("zero_shot", "prompted", "finetuned"))
        icl_update = [i - z for i, z in zip(icl, zs)]
        self.simaou.update(icl_update, [f - z for f, z in zip(ft, zs)])
        self.simaou_random.update(icl_update, random_updates)
        self.simam_icl_ft.update(runs.scores["prompted"], runs.scores["finetuned"], episodes.query_mask)
        self.simam_icl_zsl.update(runs.scores["prompted"], runs.scores["zero_shot"], episodes.query_mask)

    def compute(self) -> dict[str, float]:
        """Accuracies `<prediction>_acc`; `ft_changed` (share of episodes whose finetuned
        prediction differs from the zero-shot one); the exact conversion's `max_abs_logit_diff`
        and `rel_logit_err` (one-pass prompt vs its state), an approximate one's (vs the prompted
        logits) with `_<mode>` appended; with an untrained baseline, its metrics with
        `_untrained` appended; then `extra`."""
        row = {f"{name}_acc": float(m.compute()) for name, m in self.acc.items()}
        for name, error in self.errors.items():
            err, suffix = error.compute(), self.suffixes[name]
            row[f"max_abs_logit_diff{suffix}"], row[f"rel_logit_err{suffix}"] = float(err["max_abs"]), float(err["relative"])
        for name in ("ft_changed", "rec2ftp", "simaou", "simaou_random", "simam_icl_ft", "simam_icl_zsl"):
            row[name] = float(getattr(self, name).compute())
        if self.untrained is not None:
            row.update({f"{name}_untrained": v for name, v in self.untrained.compute().items()})
        return {**row, **self.extra}


def batches(episodes: Episodes, size: int) -> Iterator[tuple[slice, Episodes]]:
    """Consecutive groups of at most `size` episodes, with their slice."""
    for i in range(0, len(episodes), size):
        sl = slice(i, i + size)
        yield sl, episodes[sl]


def random_updates(n: int, n_embd: int, n_layer: int, seed: int) -> list[Tensor]:
    """Per layer, n random directions [n, n_embd] from a private generator (the global RNG is left
    alone): the update SimAOU's random baseline compares the ICL update with."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, n_embd, generator=gen) for _ in range(n_layer)]


@torch.no_grad()
def select_lr(model: TransformerLM, episodes: Episodes, grid: Sequence[float], finetune_kwargs: dict,
              batch_size: int = 16) -> tuple[float, dict[float, float]]:
    """The finetuning learning rate of `grid` whose finetuned copies have the lowest mean loss on
    the answers of `episodes` (teacher-forced; a diverging rate scores inf), and each rate's loss."""
    losses = {}
    for lr in grid:
        total = 0.0
        for _, group in batches(episodes, batch_size):
            weights = finetune_batched(model, *group.demonstrations(), **{**finetune_kwargs, "lr": lr})
            inputs, mask = group.query_inputs
            targets, real = group.targets
            logits = finetuned_logits(model, weights, inputs, mask, logits_at=targets.shape[1])[0]
            total += float(answer_loss(logits, targets, real).double().sum())
        loss = total / max(len(episodes), 1)
        losses[lr] = loss if math.isfinite(loss) else math.inf
    return min(grid, key=lambda lr: losses[lr]), losses


def _agreed(value: float, device) -> float:
    """`value` as rank 0 has it, under torch.distributed (every rank chose the rate on the same
    episodes, but a GPU's backward need not be bitwise deterministic, and a near-tie must not
    leave the ranks finetuning at different rates)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, src=0)
    return float(t)


def _query_key(episodes: Episodes) -> tuple:
    """What zero-shot predictions depend on: the queries and answers, as bytes."""
    inputs, mask = episodes.query_inputs
    parts = [inputs, mask, *episodes.targets, episodes.candidates]
    return tuple(None if t is None else (tuple(t.shape), t.cpu().numpy().tobytes()) for t in parts)


@torch.no_grad()
def measure(model: TransformerLM, episodes: Mapping[int, Episodes], *, finetune: dict | None = None,
            approximate: dict[str, dict] | None = None, batch_size: int = 16, untrained: TransformerLM | None = None,
            seed: int = 0, rank: int = 0, world_size: int = 1, select: Mapping[int, Episodes] | None = None,
            lr_grid: Sequence[float] | None = None, check_batches: int = 1, share_zero_shot: bool = True,
            seconds: dict[str, float] | None = None) -> dict[int, ICLMetrics]:
    """The comparison's metrics per shot count, updated on this rank's share of the episodes
    (`Episodes.shard(rank, world_size)`) and not yet computed: `compute()` syncs them across
    ranks when torch.distributed is initialised (every rank must call it).

    Args:
        model: the model (moved nowhere; the episodes go to its device).
        episodes: shot count -> its episodes (all of them; each rank takes its share).
        finetune: `finetune_batched` keyword arguments (params, lr, epochs).
        approximate: ICLAA mode -> `convert` keyword arguments, for softmax layers.
        batch_size: episodes per forward pass and per batched finetuning.
        untrained: an untrained model of the same architecture, run on the same episodes (no
            conversions); its metrics come with the suffix `_untrained`.
        seed: seed of SimAOU's random-update baseline.
        select / lr_grid: with a grid, each shot count's finetuning rate is chosen by
            `select_lr` on `select[k]` (episodes other than the evaluated ones; every rank runs
            all of them and takes rank 0's choice: the one collective here), and reported as
            `finetune_lr` and `finetune_select_loss/lr=<lr>`.
        check_batches: groups per shot count also run as one pass over the whole prompt.
        share_zero_shot: run the zero-shot prediction once per query set, shared by the shot
            counts whose groups hold the same queries (False: once per group, as a benchmark's
            "before").
        seconds: phase -> wall time, added to.
    """
    finetune = dict(finetune or {})
    if lr_grid is not None and select is None:
        raise ValueError("measure: lr_grid needs select, held-out episodes of each shot count to choose the rate on")
    device = next(model.parameters()).device
    seconds = {} if seconds is None else seconds
    zero, zero_untrained, out = {}, {}, {}
    with evaluating(model), (evaluating(untrained) if untrained is not None else contextlib.nullcontext()):
        for k, everything in episodes.items():
            kwargs = dict(finetune)
            metrics = ICLMetrics(model.config.n_layer, conversions(model, approximate), untrained is not None).to(device)
            if lr_grid is not None and everything.demo_ids.shape[1] > 0:
                if k not in select:
                    raise ValueError(f"measure: select has no episodes of {k} shots to choose the rate on "
                                     f"(it has {sorted(select)})")
                start = time.perf_counter()
                kwargs["lr"], losses = select_lr(model, select[k].to(device), lr_grid, finetune, batch_size)
                kwargs["lr"] = _agreed(kwargs["lr"], device)
                seconds["select_lr"] = seconds.get("select_lr", 0.0) + time.perf_counter() - start
                metrics.extra = {"finetune_lr": kwargs["lr"], **{f"finetune_select_loss/lr={lr:g}": v
                                                                 for lr, v in losses.items()}}
            randoms = [r[rank::world_size].to(device) for r in
                       random_updates(len(everything), model.config.n_embd, model.config.n_layer, seed)]
            mine = everything.shard(rank, world_size).to(device)
            if not share_zero_shot:
                zero, zero_untrained = {}, {}
            for i, (sl, group) in enumerate(batches(mine, batch_size)):
                key = _query_key(group) if share_zero_shot else i
                runs = EpisodeRuns(model, group, kwargs, approximate, zero_shot=zero.get(key), check=i < check_batches)
                zero.setdefault(key, runs.zero_shot_runs)
                start = time.perf_counter()
                metrics.update(runs, group, [r[sl] for r in randoms])
                runs.seconds["metrics"] = time.perf_counter() - start
                if untrained is not None:
                    base = EpisodeRuns(untrained, group, kwargs, convert_context=False, zero_shot=zero_untrained.get(key))
                    zero_untrained.setdefault(key, base.zero_shot_runs)
                    metrics.untrained.update(base, group, [r[sl] for r in randoms])
                    runs.seconds["untrained"] = sum(base.seconds.values())
                for phase, v in runs.seconds.items():
                    seconds[phase] = seconds.get(phase, 0.0) + v
            out[k] = metrics
    return out


def evaluate(model: TransformerLM, episodes: Mapping[int, Episodes], **kwargs) -> dict[int, dict[str, float]]:
    """The comparison per shot count, computed: `measure`'s metrics as plain floats (synced across
    ranks when torch.distributed is initialised). Keyword arguments: those of `measure`."""
    return {k: m.compute() for k, m in measure(model, episodes, **kwargs).items()}


def untrained_model(model: TransformerLM, seed: int) -> TransformerLM:
    """The untrained baseline of `model`: a TransformerLM of its config, initialised from `seed`
    (the global RNG is left alone), on `model`'s device and dtype, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = TransformerLM(model.config)
    p = next(model.parameters())
    return base.to(device=p.device, dtype=p.dtype).eval()
