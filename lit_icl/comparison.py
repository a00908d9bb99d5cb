"""The four predictions of the ICL-vs-finetuning comparison (Dai et al., 2023) on a group of
held-out episodes, and their metrics: zero-shot (the query alone), prompted (demonstrations
then query), converted (the query on the model carrying the demonstrations' state, Chen et
al., 2024; exact, and the approximate modes of softmax models) and finetuned (the query on a
copy finetuned on the demonstrations). `ICLConversionCallback` runs them at validation."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from lit_icl.context import convert
from lit_icl.data.episodes import Episodes
from lit_icl.finetune import finetune_batched, finetuned_logits
from lit_icl.metrics import CandidateAccuracy, ConversionError, Rec2FTP, SimAM, SimAOU, predict
from lit_icl.model import TransformerLM

__all__ = ["Conversion", "EpisodeRuns", "ICLMetrics", "batches", "conversions", "prediction_names"]


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


class EpisodeRuns:
    """The runs of Dai et al. 2023's comparison on one group of episodes: for each prediction the logits at the
    query's last position [N, V], and for zero_shot / prompted / finetuned the per-layer
    attention outputs there [N, C] and the scores over the query's own tokens [N, H, Q].
    `approximate` maps ICLAA modes to convert() keyword arguments (modes the model lacks are skipped).
    `seconds` holds the wall time of each phase (zero_shot, prompted, convert, finetune,
    finetuned), which the callback logs so that the evaluation's cost can be read per part."""

    def __init__(self, model: TransformerLM, episodes: Episodes, finetune_kwargs: dict,
                 approximate: dict[str, dict] | None = None, convert_context: bool = True):
        converted = conversions(model, approximate) if convert_context else []
        self.seconds: dict[str, float] = {}
        query, qmask, Q = episodes.query_ids, episodes.query_mask, episodes.query_ids.shape[1]
        with self.timed("zero_shot"):
            zs = model.run(query, attention_mask=qmask, need_attn=True, logits_at="last")
        self.logits = {"zero_shot": zs.logits[:, -1]}
        self.outputs = {"zero_shot": [a[:, -1] for a in zs.attn_outputs]}
        self.scores = {"zero_shot": zs.attn_scores}
        if episodes.demo_ids.shape[1] == 0:  # no demonstrations: every prediction is the query alone
            for name in prediction_names(converted)[1:]:
                self.logits[name] = self.logits["zero_shot"]
                self.outputs[name], self.scores[name] = self.outputs["zero_shot"], self.scores["zero_shot"]
            return
        with self.timed("prompted"):
            pr = model.run(episodes.prompts, attention_mask=episodes.prompt_mask, need_attn=True, logits_at="last")
        self.logits["prompted"] = pr.logits[:, -1]
        self.outputs["prompted"] = [a[:, -1] for a in pr.attn_outputs]
        self.scores["prompted"] = [s[..., -Q:] for s in pr.attn_scores]
        with self.timed("convert"):
            for name, _, kwargs in converted:
                state = convert(model, episodes.demo_ids, attention_mask=episodes.demo_mask, **kwargs)
                self.logits[name] = model.run(query, state=state, attention_mask=qmask, logits_at="last").logits[:, -1]
        with self.timed("finetune"):
            weights = finetune_batched(model, *episodes.demonstrations(), **finetune_kwargs)
        with self.timed("finetuned"):
            logits, outputs, scores = finetuned_logits(model, weights, query, qmask, need_attn=True, logits_at="last")
        self.logits["finetuned"] = logits[:, -1]
        self.outputs["finetuned"] = [a[:, -1] for a in outputs]
        self.scores["finetuned"] = scores

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
    untrained model, updated by the caller and computed with these under the suffix `_untrained`."""

    def __init__(self, n_layer: int, converted: Sequence[Conversion], untrained: bool = False):
        super().__init__()
        self.untrained = ICLMetrics(n_layer, []) if untrained else None
        self.names = prediction_names(converted)
        self.acc = torch.nn.ModuleDict({name: CandidateAccuracy() for name in self.names})
        self.errors = torch.nn.ModuleDict({c.name: ConversionError() for c in converted})
        self.suffixes = {c.name: c.suffix for c in converted}
        self.rec2ftp = Rec2FTP()
        self.simaou, self.simaou_random = SimAOU(n_layer), SimAOU(n_layer)
        self.simam_icl_ft, self.simam_icl_zsl = SimAM(n_layer), SimAM(n_layer)

    def update(self, runs: EpisodeRuns, episodes: Episodes, random_updates: list[Tensor]) -> None:
        correct = {}
        for name in self.names:
            self.acc[name].update(runs.logits[name], episodes.candidates, episodes.answers)
            correct[name] = predict(runs.logits[name], episodes.candidates) == episodes.answers
        for name, error in self.errors.items():
            error.update(runs.logits["prompted"], runs.logits[name])
        self.rec2ftp.update(correct["zero_shot"], correct["finetuned"], correct["prompted"])
        zs, icl, ft = (runs.outputs[n] for n in ("zero_shot", "prompted", "finetuned"))
        icl_update = [i - z for i, z in zip(icl, zs)]
        self.simaou.update(icl_update, [f - z for f, z in zip(ft, zs)])
        self.simaou_random.update(icl_update, random_updates)
        self.simam_icl_ft.update(runs.scores["prompted"], runs.scores["finetuned"], episodes.query_mask)
        self.simam_icl_zsl.update(runs.scores["prompted"], runs.scores["zero_shot"], episodes.query_mask)

    def compute(self) -> dict[str, float]:
        """Accuracies `<prediction>_acc`; the exact conversion's `max_abs_logit_diff` and
        `rel_logit_err` (to the prompted logits), an approximate one's with `_<mode>` appended;
        with an untrained baseline, its metrics with `_untrained` appended."""
        row = {f"{name}_acc": float(m.compute()) for name, m in self.acc.items()}
        for name, error in self.errors.items():
            err, suffix = error.compute(), self.suffixes[name]
            row[f"max_abs_logit_diff{suffix}"], row[f"rel_logit_err{suffix}"] = float(err["max_abs"]), float(err["relative"])
        for name in ("rec2ftp", "simaou", "simaou_random", "simam_icl_ft", "simam_icl_zsl"):
            row[name] = float(getattr(self, name).compute())
        if self.untrained is not None:
            row.update({f"{name}_untrained": v for name, v in self.untrained.compute().items()})
        return row


def batches(episodes: Episodes, size: int) -> Iterator[tuple[slice, Episodes]]:
    """Consecutive groups of at most `size` episodes, with their slice."""
    for i in range(0, len(episodes), size):
        sl = slice(i, i + size)
        yield sl, episodes[sl]
