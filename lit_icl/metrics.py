"""Metrics of the ICL comparison (Dai et al. 2023, "Why Can GPT Learn In-Context?", ACL Findings,
arXiv 2212.10559), in the torchmetrics pattern: functions that compute a batch's values
(`candidate_correct`, `exact_match`, `greedy`, `answer_loss`) and thin stateful `Metric`s that
accumulate them. Each Metric declares its state with `add_state(..., dist_reduce_fx=...)`, so
values computed on shards of episodes in several processes sync to the value one process would
get on all of them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric


def predict(last_logits: Tensor, candidates: Tensor) -> Tensor:
    """Dai et al. 2023: a prediction is the argmax over the candidate label tokens at the query's last
    position. last_logits [N, V], candidates [K] -> predicted token ids [N]."""
    return candidates[last_logits[:, candidates].argmax(dim=-1)]


def candidate_correct(last_logits: Tensor, candidates: Tensor, answers: Tensor) -> Tensor:
    """[N] bool: the candidate argmax (`predict`) is the answer."""
    return predict(last_logits, candidates) == answers


def greedy(logits: Tensor, mask: Tensor) -> Tensor:
    """The argmax token at every answer position, teacher-forced: logits [N, A, V], mask [N, A]
    (bool, real positions) -> [N, A] token ids, -1 at padding."""
    return logits.argmax(dim=-1).masked_fill(~mask, -1)


def exact_match(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """[N] bool: every real answer position's argmax, given the correct tokens before it, is the
    correct token (logits [N, A, V], targets [N, A], mask [N, A] bool). Equal to "the greedy
    continuation of the query begins with the answer's A tokens", from one forward pass."""
    return ((logits.argmax(dim=-1) == targets) | ~mask).all(dim=1)


def answer_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """[N] mean cross-entropy of the answer's real tokens, teacher-forced (logits [N, A, V])."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)
    return torch.where(mask, losses, 0.0).sum(1) / mask.sum(1).clamp(min=1)  # padding: never read, even if NaN


class Rate(Metric):
    """The share of True among per-episode flags (`update(flags)` with a [N] bool tensor): an
    accuracy, or how often two predictions differ."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, flags: Tensor) -> None:
        self.correct += flags.sum()
        self.total += flags.numel()

    def compute(self) -> Tensor:
        return self.correct / self.total


class CandidateAccuracy(Rate):
    """Fraction of episodes whose candidate argmax is the answer (`candidate_correct`)."""

    def update(self, last_logits: Tensor, candidates: Tensor, answers: Tensor) -> None:
        super().update(candidate_correct(last_logits, candidates, answers))


class ExactMatch(Rate):
    """Fraction of episodes whose teacher-forced greedy answer is exactly right (`exact_match`)."""

    def update(self, logits: Tensor, targets: Tensor, mask: Tensor) -> None:
        super().update(exact_match(logits, targets, mask))


class ConversionError(Metric):
    """How far converted logits are from prompted ones: `max_abs` = max |l_p - l_c| and
    `relative` = ||l_p - l_c|| / ||l_p|| (the conversion paper's relative logit error), with the
    norms taken over every logit of every episode. Both are NaN when nothing was compared (not 0:
    an unchecked conversion must not read as an exact one)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("max_abs", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("sq_diff", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq_ref", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("compared", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prompted: Tensor, converted: Tensor) -> None:
        diff = (prompted - converted).double()
        self.compared += diff.numel()
        if diff.numel():
            self.max_abs = torch.maximum(self.max_abs, diff.abs().max())
        self.sq_diff += diff.square().sum()
        self.sq_ref += prompted.double().square().sum()

    def compute(self) -> dict[str, Tensor]:
        if self.compared == 0:
            nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.max_abs.device)
            return {"max_abs": nan, "relative": nan}
        return {"max_abs": self.max_abs, "relative": (self.sq_diff / self.sq_ref).sqrt()}


class Rec2FTP(Metric):
    """Dai et al. 2023: Rec2FTP = #(ZSL wrong, FT right, ICL right) / #(ZSL wrong, FT right): how much of
    what finetuning fixes in-context learning fixes too. NaN when finetuning fixed nothing."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("recalled", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fixed_by_ft", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, zsl_correct: Tensor, ft_correct: Tensor, icl_correct: Tensor) -> None:
        base = ~zsl_correct.bool() & ft_correct.bool()
        self.fixed_by_ft += base.sum()
        self.recalled += (base & icl_correct.bool()).sum()

    def compute(self) -> Tensor:
        return self.recalled / self.fixed_by_ft


class _LayerCosine(Metric):
    """Mean over examples of a per-layer cosine, then over layers; `per_layer` keeps the layers."""

    full_state_update = False

    def __init__(self, n_layer: int, **kwargs):
        super().__init__(**kwargs)
        if n_layer < 1:
            raise ValueError(f"n_layer={n_layer} must be >= 1")
        self.add_state("sums", torch.zeros(n_layer, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, cos: Tensor) -> None:
        """cos [n_layer, N]."""
        self.sums += cos.double().sum(dim=1)
        self.count += cos.shape[1]

    def per_layer(self) -> Tensor:
        return self.sums / self.count

    def compute(self) -> Tensor:
        return self.per_layer().mean()


class SimAOU(_LayerCosine):
    """Dai et al. 2023: similarity of attention output updates. Per layer, the cosine between the ICL
    update and the FT update of the attention output at the query's last position (after the
    output projection, before the residual), each L2-normalised first:
    cos(h_ICL - h_ZSL, h_FT - h_ZSL); averaged over examples, then layers. Feed a random update
    as `ft_update` for the paper's random baseline."""

    def update(self, icl_update: list[Tensor], ft_update: list[Tensor]) -> None:
        """Per layer, updates [N, C]."""
        cos = [
            (F.normalize(a.double(), dim=-1) * F.normalize(b.double(), dim=-1)).sum(-1)
            for a, b in zip(icl_update, ft_update, strict=True)
        ]
        self._add(torch.stack(cos))


class SimAM(_LayerCosine):
    """Dai et al. 2023: similarity of attention maps. Per layer, the cosine between two models'
    attention-score vectors (pre-softmax q.k/sqrt(d); phi(q).phi(k) for linear attention) of the
    query's last token over the query's own tokens (demonstrations excluded), averaged over
    heads, examples, then layers. With a one-token query the vectors have one entry and the
    cosine is its sign.

    Left-padded queries: `query_mask` [N, Q] (1 = real token) restricts each cosine to the
    query's real tokens. Without it, a softmax model's scores at padding positions (q.k of the
    padding token's key, which the attention itself masks out) would enter the cosine."""

    def update(self, scores_a: list[Tensor], scores_b: list[Tensor], query_mask: Tensor | None = None) -> None:
        """Per layer, scores [N, H, Q] over the query's Q tokens; query_mask [N, Q] or None."""
        keep = None if query_mask is None else query_mask.bool()[:, None, :]
        cos = [
            F.cosine_similarity(*(s.double() if keep is None else s.double().masked_fill(~keep, 0.0) for s in (a, b)),
                                dim=-1, eps=1e-12).mean(dim=1)
            for a, b in zip(scores_a, scores_b, strict=True)
        ]
        self._add(torch.stack(cos))
