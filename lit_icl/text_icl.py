"""In-context learning on held-out text, task-free: the per-position loss, the ICL score and
the conversion of a document's prefix into state, measured at every validation.

Olsson et al. 2022 ("In-context Learning and Induction Heads", Transformer Circuits, section
"Defining the in-context learning score") measure in-context learning during pretraining as the
loss of a late token of the context minus that of an early one (their 500th minus 50th),
averaged over held-out text: more negative means more use of the context. It drops abruptly
when induction heads form (the "phase change"), while the loss against token position bends
down at late positions.

Here position t (1 <= t <= L) is the prediction of a document's (t+1)-th token from its first
t tokens, so L = the held-out documents' length - 1 positions are measured; the ICL score is
loss(late) - loss(early). Exact conversion (Chen et al. 2024, ICML, Algorithm 1) has a direct
reading on text: `convert` the first P tokens of a document into state, and the loss of the
remaining tokens on the state must equal their loss inside the whole document (at float
rounding for every exact kind; for softmax layers, ICLAA's approximate modes lose information,
and their loss gap measures how much).

    losses = token_losses(model, documents)              # [N, L]
    score = icl_score(losses.mean(0), early=50, late=500)
    rest = converted_losses(model, documents, prefix=P)  # [N, L - P] == losses[:, P:]

`TextICLCallback` logs these at validation end (names under `icl/text/`, listed in its
docstring) for any DataModule with `heldout_documents` (the `HeldoutDocuments` protocol).
"""
from __future__ import annotations

import math
import time
from typing import Protocol, Sequence, runtime_checkable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import Metric

from lit_icl.evaluation import Conversion, conversions
from lit_icl.context import convert
from lit_icl.errors import first_line
from lit_icl.mixers import APPROXIMATE_MODES
from lit_icl.model import TransformerLM, evaluating
from lit_icl.validation_measure import ValidationMeasure

__all__ = ["HeldoutDocuments", "TextICLCallback", "TextICLMetrics", "converted_losses", "default_positions",
           "icl_score", "log_bins", "loss_near", "token_losses"]

OLSSON_POSITIONS = (50, 500)  # Olsson et al. 2022's early and late tokens


@runtime_checkable
class HeldoutDocuments(Protocol):
    """What the text measures need of a DataModule: held-out documents of contiguous text, as
    token ids [N, L + 1] (N at most `num_documents`, each a span of one held-out text), the
    same on every call. ValueError when the held-out text is not contiguous."""

    def heldout_documents(self, num_documents: int) -> Tensor: ...


def token_losses(model: TransformerLM, documents: Tensor, state=None) -> Tensor:
    """Next-token cross-entropy [N, T - 1] of documents [N, T]: column t-1 is the loss of token
    t+1 given tokens 1..t (and the context `state`, if given)."""
    logits = model.run(documents[:, :-1], state=state).logits
    return F.cross_entropy(logits.transpose(1, 2), documents[:, 1:], reduction="none")


def converted_losses(model: TransformerLM, documents: Tensor, prefix: int, **convert_kwargs) -> Tensor:
    """The losses [N, T - 1 - prefix] of documents [N, T] after their first `prefix` tokens,
    predicted on the state `convert` makes of those tokens (keyword arguments: its mode, ...):
    for an exact mode equal to `token_losses(model, documents)[:, prefix:]` up to rounding."""
    state = convert(model, documents[:, :prefix], **convert_kwargs)
    return token_losses(model, documents[:, prefix:], state=state)


def log_bins(length: int) -> list[tuple[int, int]]:
    """Positions 1..length in bins doubling in width: [1, 1], [2, 3], [4, 7], ... (the last cut
    at `length`), as (first, last) pairs."""
    return [(lo, min(2 * lo - 1, length)) for lo in (2 ** i for i in range(int(math.log2(length)) + 1))]


def loss_near(loss_at: Tensor, position: int, window: float = 0.0) -> float:
    """The mean of `loss_at` [L] (position t at index t - 1) over the positions within
    +-`window` * position of `position` (within 1..L); window 0: that position alone."""
    half = int(window * position)
    return float(loss_at[max(1, position - half) - 1 : min(len(loss_at), position + half)].mean())


def icl_score(loss_at: Tensor, early: int, late: int, window: float = 0.0) -> float:
    """Olsson et al. 2022's ICL score: the loss at position `late` minus that at `early`, from the
    mean loss per position `loss_at` [L]; with `window`, each term averages the positions within
    +-window * its position (a few documents make single positions noisy)."""
    return loss_near(loss_at, late, window) - loss_near(loss_at, early, window)


def default_positions(length: int) -> tuple[int, int]:
    """Olsson et al.'s (50, 500) when documents measure 500 positions, else (length // 10, length):
    the same tenfold ratio, as late as the documents allow."""
    if length >= OLSSON_POSITIONS[1]:
        return OLSSON_POSITIONS
    return max(1, length // 10), length


class TextICLMetrics(Metric):
    """Sums over documents, reduced across ranks: the loss per position, and per conversion the
    loss of the positions after the prefix on the state, the same positions' loss in the whole
    document, and the largest per-token difference. `compute` gives means (float64)."""

    full_state_update = False

    def __init__(self, length: int, names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.names = list(names)
        f64 = dict(dtype=torch.float64)
        self.add_state("loss_sum", torch.zeros(length, **f64), dist_reduce_fx="sum")
        self.add_state("documents", torch.tensor(0.0, **f64), dist_reduce_fx="sum")
        self.add_state("prompted_sum", torch.tensor(0.0, **f64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, **f64), dist_reduce_fx="sum")
        for name in self.names:
            self.add_state(f"{name}_sum", torch.tensor(0.0, **f64), dist_reduce_fx="sum")
            self.add_state(f"{name}_max", torch.tensor(0.0, **f64), dist_reduce_fx="max")

    def update(self, losses: Tensor, converted: dict[str, Tensor]) -> None:
        """losses [n, L] of whole documents; converted: name -> [n, L - prefix] on the state."""
        losses = losses.double()
        self.loss_sum += losses.sum(0)
        self.documents += losses.shape[0]
        for name, rest in converted.items():
            prompted = losses[:, losses.shape[1] - rest.shape[1]:]
            diff = rest.double() - prompted
            setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + rest.double().sum())
            setattr(self, f"{name}_max", torch.maximum(getattr(self, f"{name}_max"), diff.abs().max()))
        if converted:
            self.prompted_sum += prompted.sum()
            self.tokens += prompted.numel()

    def compute(self) -> dict[str, Tensor]:
        out = {"loss_at": self.loss_sum / self.documents, "prompted": self.prompted_sum / self.tokens,
               "documents": self.documents}
        for name in self.names:
            out[name] = getattr(self, f"{name}_sum") / self.tokens
            out[f"{name}_max"] = getattr(self, f"{name}_max")
        return out


class TextICLCallback(ValidationMeasure):
    """The per-position loss, the ICL score and prefix conversion on held-out documents, at
    validation end. It logs (all under `icl/text/`):

    - `score`: loss(late) - loss(early) (Olsson et al. 2022; with `window`, each term the mean
      over the positions within +-window of it); `loss_early`, `loss_late` its terms;
    - `loss_at/<p>`: the mean loss over positions p..2p-1 (p = 1, 2, 4, ...; the last bin is cut
      at the documents' length), and `loss`, the mean over all positions;
    - `prompted_loss`: the mean loss of the positions after the first `prefix` tokens, in the
      whole document; `converted_loss`: the same tokens on the state of the converted prefix
      (the model's exact mode: every kind, momentum and hybrids included); `converted_loss_diff`
      (converted - prompted: rounding for an exact mode) and `converted_max_abs_diff` (the largest
      per-token |difference|); for softmax layers also `converted_<mode>_loss`,
      `converted_<mode>_loss_diff`, `converted_<mode>_max_abs_diff` of ICLAA's approximate modes
      (Chen et al. 2024; the loss gap is the information they lose);
    - `documents` (how many were measured, over all ranks), `seconds` (this measurement's wall
      time) and `failed` (1 for a validation whose measurement failed, else 0);
    - a TensorBoard figure `icl/text/loss_vs_position`: the loss against position, one curve per
      validation so far (rank zero).

    Positions count tokens of context: position t is the prediction of token t+1 from the first
    t. The documents are the DataModule's `heldout_documents(num_documents)` (a fixed set,
    strided across DDP ranks, the sums reduced across them); their length minus one is the
    number of positions. Checked at start: the DataModule offers contiguous documents, they
    fit the model's block_size, 1 <= early < late <= positions and 1 <= prefix < positions.
    Scheduling and failure handling: `lit_icl.validation_measure.ValidationMeasure`.

    Args:
        num_documents: held-out documents measured (fewer if the DataModule has fewer).
        positions: (early, late) of the ICL score; None: Olsson et al.'s (50, 500) when the
            documents measure 500 positions, else (positions // 10, positions), said in the log.
        window: 0 for Olsson et al.'s single positions; else each term of the score averages the
            positions within +-window * its position (0.1: 23..27 and 231..256 for (25, 256)),
            which a small held-out set needs: its single positions hold the same few tokens at
            every measurement.
        prefix: tokens of each document converted into state; None: half the positions.
        batch_size: documents per forward pass.
        every_n_validations: run at the 1st validation and every n-th after it.
        approximate_modes: for softmax layers, ICLAA modes ("prf", "taylor") measured next to
            the exact KV prefix.
        num_features: random features of mode "prf".
        seed: seed of the random features.
    """

    prefix = "icl/text"
    needs = "it runs and converts it on held-out documents"

    def __init__(
        self,
        num_documents: int = 64,
        positions: Sequence[int] | None = None,
        window: float = 0.0,
        prefix: int | None = None,
        batch_size: int = 16,
        every_n_validations: int = 1,
        approximate_modes: Sequence[str] = ("taylor", "prf"),
        num_features: int = 256,
        seed: int = 0,
    ):
        super().__init__(every_n_validations)
        if num_documents < 1 or batch_size < 1:
            raise ValueError(f"num_documents={num_documents} and batch_size={batch_size} must be >= 1")
        if positions is not None and (len(positions) != 2 or not 1 <= positions[0] < positions[1]):
            raise ValueError(f"positions={list(positions)} must be two positions early < late, both >= 1")
        if not 0.0 <= window < 1.0:
            raise ValueError(f"window={window} must be in [0, 1)")
        if prefix is not None and prefix < 1:
            raise ValueError(f"prefix={prefix} must be >= 1")
        unknown = set(approximate_modes) - set(APPROXIMATE_MODES)
        if unknown:
            raise ValueError(f"approximate_modes={list(approximate_modes)}: unknown {sorted(unknown)}; "
                             f"allowed: {', '.join(APPROXIMATE_MODES)}")
        self.num_documents, self.batch_size = num_documents, batch_size
        self.positions = None if positions is None else (int(positions[0]), int(positions[1]))
        self.prefix_tokens, self.window = prefix, window
        self.approximate = {m: dict(mode=m, num_features=num_features, seed=seed) for m in approximate_modes}
        self.documents: Tensor | None = None
        self.early = self.late = self.split = 0
        self.results: dict[str, float] = {}
        self.history: list[tuple[int, list[float]]] = []  # (step, loss per position) of each measurement

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the held-out documents and check the positions and the prefix (see the class docstring)."""
        name, datamodule = type(self).__name__, trainer.datamodule
        if not isinstance(datamodule, HeldoutDocuments):
            raise ValueError(f"{name} needs a DataModule with heldout_documents(num_documents) (the HeldoutDocuments "
                             f"protocol of lit_icl.text_icl), got {type(datamodule).__name__}")
        try:
            documents = datamodule.heldout_documents(self.num_documents)
        except ValueError as err:
            raise ValueError(f"{name}: {first_line(err)}") from err
        length, block_size = documents.shape[1] - 1, pl_module.model.config.block_size
        if documents.ndim != 2 or len(documents) == 0 or length < 2:
            raise ValueError(f"{name}: the DataModule's held-out documents have shape {list(documents.shape)}; "
                             "at least one document of 3 tokens or more is needed")
        if length > block_size:
            raise ValueError(f"{name}: held-out documents of {length + 1} tokens need block_size >= {length}, "
                             f"the model has {block_size}")
        early, late = self.positions or default_positions(length)
        if late > length:
            raise ValueError(f"{name}: positions ({early}, {late}) do not fit the held-out documents, which measure "
                             f"{length} positions (the data's block_size); use positions with 1 <= early < late <= {length}")
        split = length // 2 if self.prefix_tokens is None else self.prefix_tokens
        if split >= length:
            raise ValueError(f"{name}: prefix={split} leaves no token to predict in documents of {length + 1} "
                             f"tokens; use prefix < {length}")
        if self.positions is None and (early, late) != OLSSON_POSITIONS:
            rank_zero_info(f"icl/text: the ICL score is loss({late}) - loss({early}): Olsson et al.'s positions "
                           f"(50, 500) do not fit documents of {length} positions (set the callback's positions)")
        self.documents, self.early, self.late, self.split = documents.long(), early, late, split

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: TransformerLM) -> TextICLMetrics:
        """This rank's strided share of the documents, measured; the metrics not yet computed."""
        if self.documents is None:
            self.prepare(trainer, pl_module)
        return self.evaluate(model, self.documents[trainer.global_rank :: trainer.world_size].to(pl_module.device))

    def evaluate(self, model: TransformerLM, documents: Tensor) -> TextICLMetrics:
        """The metrics of `documents` [N, L + 1] (updated, not computed)."""
        converted = conversion_names(model, self.approximate)
        metrics = TextICLMetrics(documents.shape[1] - 1, [n for n, _ in converted]).to(documents.device)
        with evaluating(model), torch.no_grad():
            for i in range(0, len(documents), self.batch_size):
                batch = documents[i : i + self.batch_size]
                rest = {n: converted_losses(model, batch, self.split, **c.kwargs) for n, c in converted}
                metrics.update(token_losses(model, batch), rest)
        return metrics

    def publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: TextICLMetrics, start: float) -> None:
        out = metrics.compute()  # syncs across ranks
        loss_at = out.pop("loss_at").cpu()
        early, late = (loss_near(loss_at, p, self.window) for p in (self.early, self.late))
        scalars = {"score": late - early, "loss_early": early, "loss_late": late, "loss": float(loss_at.mean()),
                   "prompted_loss": float(out.pop("prompted"))}
        for lo, hi in log_bins(len(loss_at)):
            scalars[f"loss_at/{lo}"] = float(loss_at[lo - 1 : hi].mean())
        for name in metrics.names:
            scalars[f"{name}_loss"] = float(out[name])
            scalars[f"{name}_loss_diff"] = float(out[name]) - scalars["prompted_loss"]
            scalars[f"{name}_max_abs_diff"] = float(out[f"{name}_max"])
        scalars["documents"] = float(out["documents"])  # over all ranks
        scalars["seconds"], scalars["failed"] = time.perf_counter() - start, 0.0
        self.results = scalars
        self.history.append((trainer.global_step, loss_at.tolist()))
        pl_module.log_dict({f"icl/text/{k}": v for k, v in scalars.items()}, sync_dist=False)  # already reduced
        rank_zero_info(f"icl/text: step {trainer.global_step}: ICL score loss({self.late}) - loss({self.early}) = "
                       f"{scalars['score']:+.3f}, converted - prompted loss {scalars['converted_loss_diff']:+.2e} "
                       f"({scalars['seconds']:.2f} s)")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    from lit_icl.plots import loss_vs_position

                    fig = loss_vs_position(self.history, (self.early, self.late))  # add_figure closes it
                    logger.experiment.add_figure("icl/text/loss_vs_position", fig, global_step=trainer.global_step)

    def state_dict(self) -> dict:
        """The curves so far (a resumed run keeps drawing them)."""
        return {"history": self.history, "validations": self.validations}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [tuple(h) for h in state_dict.get("history", [])]
        self.validations = state_dict.get("validations", 0)


def conversion_names(model: TransformerLM, approximate: dict[str, dict]) -> list[tuple[str, Conversion]]:
    """`converted` for the model's exact mode, `converted_<mode>` for each approximate one."""
    return [(f"converted{c.suffix}", c) for c in conversions(model, approximate)]
