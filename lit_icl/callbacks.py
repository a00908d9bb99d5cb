"""ICLConversionCallback: measure in-context learning while a model trains, by the comparison of
in-context learning with explicit finetuning of Dai et al. 2023 ("Why Can GPT Learn In-Context?
Language Models Secretly Perform Gradient Descent as Meta-Optimizers", ACL Findings, arXiv
2212.10559).

At validation end it takes the DataModule's held-out episodes for each shot count and compares
four predictions on the same queries:

- zero_shot: the query alone;
- prompted: the demonstrations, then the query (ICL);
- converted: the query alone on the model carrying the demonstrations' state
  (`lit_icl.context.convert` in the model's exact mode; a mode other than "exact" is named in
  the prediction: `converted_kv` for a softmax KV prefix, `converted_<mode>` for ICLAA's);
- finetuned: the query alone on a copy finetuned on the demonstrations (`lit_icl.finetune`,
  all episodes of a shot count at once).

The comparison itself is `lit_icl.evaluation.measure`, a plain function; this callback schedules
it, checks at start that it can run, and logs. A label task (MR, BBC) is scored by the argmax over
its candidate label tokens, an open-vocabulary one (a function task) by exact match of the
answer's tokens, teacher-forced.

It logs under `icl/<metric>/k=<shots>` the four accuracies, the conversion error, the share of
episodes whose finetuned prediction differs from the zero-shot one (ft_changed), Rec2FTP,
SimAOU (and its random baseline) and SimAM(ICL, FT) / SimAM(ICL, ZSL), and with a grid of
finetuning rates the chosen one (finetune_lr); `hp/<prediction>_acc`
(largest shot count) for TensorBoard's hparams view; a figure of accuracy against the number of
demonstrations; and `icl/eval_seconds`. A table is printed when fitting ends.

With `untrained_baseline`, the same episodes also run on an untrained model of the same
architecture, and its Rec2FTP, SimAOU (and random baseline) and SimAM figures, with its
zero-shot / prompted / finetuned accuracies, are logged with the suffix `_untrained`
(`icl/simaou_untrained/k=4`, ...): Deutch et al. (NAACL 2024, "In-context learning and gradient
descent revisited") found that untrained models reach ICL-vs-GD similarity scores comparable to
trained ones, so a similarity figure means little without this baseline next to it.

The DataModule follows the `HeldoutEpisodes` protocol (and `HeldoutTasks` to report several tasks
each on its own): the same episodes on every call, so successive evaluations are comparable. Under DDP each rank takes a
strided share of the episodes and the torchmetrics states are reduced across ranks. The
training model is handed back as it was: parameters, mode and the global RNG are not touched.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Protocol, Sequence, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from lit_icl.evaluation import ICLMetrics, measure, untrained_model
from lit_icl.data.episodes import Episodes
from lit_icl.errors import first_line as _first_line
from lit_icl.mixers import APPROXIMATE_MODES
from lit_icl.model import TransformerLM
from lit_icl.validation_measure import ValidationMeasure

@runtime_checkable
class HeldoutEpisodes(Protocol):
    """What the callback needs of a DataModule: held-out ICL episodes per shot count, the same
    on every call (`lit_icl.data.Episodes`: demonstrations, query, answer, candidates)."""

    def heldout_episodes(self, n_shots: int, num_episodes: int | None = None) -> Episodes: ...


@runtime_checkable
class HeldoutTasks(HeldoutEpisodes, Protocol):
    """A DataModule of several tasks: their names, and `heldout_episodes(..., task=name)`."""

    def heldout_tasks(self) -> list[str]: ...

    def heldout_episodes(self, n_shots: int, num_episodes: int | None = None, task: str | None = None) -> Episodes: ...


class ICLConversionCallback(ValidationMeasure):
    """Zero-shot vs prompted vs converted vs finetuned, per shot count, at validation end.

    The scheduling, the checks at start and the no-training-lost behaviour are
    `lit_icl.validation_measure.ValidationMeasure`'s, shared with the text measures.

    Before anything runs (at the start of fit, validate and test alike) it builds the held-out
    episodes of every task and shot count once and checks that they can be evaluated: the
    DataModule offers them, every shot count exists, the candidates are distinct tokens, and
    every prompt (demonstrations + query) fits the model's block_size. A setting that cannot
    work stops the run there, with one line, instead of at the first validation.

    During `fit`, an exception inside the evaluation costs no training: it is reported in one
    line, `icl/failed` = 1 is logged for that validation, and training goes on (so the
    validation's checkpoint is written as usual). In `validate` / `test` it is raised.

    Args:
        shots: numbers of demonstrations to evaluate (each one the DataModule offers).
        num_episodes: held-out episodes per shot count (None: the DataModule's default).
        every_n_validations: run at the 1st validation and every n-th after it.
        batch_size: episodes per forward pass (and per batched finetuning).
        finetune_params: what the finetuned copy trains: "kv" (the paper) | "attention" | "all".
        finetune_lr: SGD learning rate of the finetuned copy, or a list of rates: then each task
            and shot count uses the one whose finetuned copies have the lowest loss on the answers
            of `select_episodes` other held-out episodes (logged as icl/finetune_lr/k=<shots>).
        finetune_epochs: passes over the demonstrations.
        select_episodes: held-out episodes per task and shot count that choose the rate (with a
            list of rates), taken after the evaluated ones.
        tasks: the DataModule's tasks to evaluate (None: all of them).
        check_batches: groups of `batch_size` episodes per shot count whose prompts also run in one
            pass, to check the state the prompted prediction continues from (see
            `lit_icl.evaluation`); the exact conversion error is measured on them.
        approximate_modes: for softmax models, ICLAA modes ("prf", "taylor") evaluated next to
            the exact KV prefix (logged as converted_<mode>).
        num_features: random features of mode "prf".
        seed: seed of the random updates of SimAOU's baseline and of the random features.
        too_long: what to do with an episode whose prompt is longer than block_size: "error"
            (stop at start, naming task, shots and lengths) or "drop" (drop that episode's
            longest demonstrations until it fits; the count is reported and logged as
            icl/dropped_demos/k=<shots>).
        untrained_baseline: also evaluate an untrained model of the same architecture (zero-shot,
            prompted, finetuned; no conversion) and log its metrics with the suffix `_untrained`.
            Its weights: those of the model when fit starts (before any checkpoint is restored),
            or, for a pretrained model (`pretrained` in the module's hparams) and outside fit,
            the model class's own initialisation drawn from `seed`.
    """

    needs = "it converts, copies and finetunes it"

    def __init__(
        self,
        shots: Sequence[int] = (0, 2, 4, 8),
        num_episodes: int | None = None,
        every_n_validations: int = 1,
        batch_size: int = 256,
        finetune_params: str = "kv",
        finetune_lr: float | Sequence[float] = 0.1,
        finetune_epochs: int = 1,
        approximate_modes: Sequence[str] = ("taylor", "prf"),
        num_features: int = 256,
        seed: int = 0,
        too_long: str = "error",
        untrained_baseline: bool = False,
        select_episodes: int = 16,
        tasks: Sequence[str] | None = None,
        check_batches: int = 1,
    ):
        if not shots or any(int(k) < 0 for k in shots):
            raise ValueError(f"shots={list(shots)} must be a non-empty list of counts >= 0")
        if every_n_validations < 1 or batch_size < 1:
            raise ValueError(
                f"every_n_validations={every_n_validations} and batch_size={batch_size} must be >= 1"
            )
        if too_long not in ("error", "drop"):
            raise ValueError(f"too_long={too_long!r}; allowed: 'error', 'drop'")
        grid = [float(lr) for lr in finetune_lr] if isinstance(finetune_lr, (list, tuple)) else None
        if grid == [] or any(lr <= 0 or not lr < float("inf") for lr in grid or [float(finetune_lr)]):
            raise ValueError(f"finetune_lr={finetune_lr!r} must be a rate > 0 or a non-empty list of them")
        if select_episodes < 1 or check_batches < 0:
            raise ValueError(f"select_episodes={select_episodes} must be >= 1 and check_batches={check_batches} >= 0")
        if tasks is not None and (isinstance(tasks, str) or not tasks):
            raise ValueError(f"tasks={tasks!r} must be a non-empty list of task names (or null: all)")
        super().__init__(every_n_validations)
        self.shots = sorted({int(k) for k in shots})
        self.num_episodes = num_episodes
        self.batch_size = batch_size
        self.lr_grid, self.select_episodes = grid, select_episodes
        self.tasks, self.check_batches = None if tasks is None else list(tasks), check_batches
        self.finetune_kwargs = dict(params=finetune_params, lr=grid[0] if grid else float(finetune_lr),
                                    epochs=finetune_epochs)
        unknown = set(approximate_modes) - set(APPROXIMATE_MODES)
        if unknown:
            raise ValueError(f"approximate_modes={list(approximate_modes)}: unknown {sorted(unknown)}; "
                             f"allowed: {', '.join(APPROXIMATE_MODES)}")
        self.approximate = {m: dict(mode=m, num_features=num_features, seed=seed) for m in approximate_modes}
        self.seed = seed
        self.too_long = too_long
        self.untrained_baseline = untrained_baseline
        self.untrained: TransformerLM | None = None
        self.declared_hparams = False
        self.episodes: dict[tuple[str, int], Episodes] = {}  # (task, shots) -> the checked episodes
        self.select: dict[tuple[str, int], Episodes] = {}  # (task, shots) -> the episodes that choose the rate
        self.name_tasks = False  # whether scalars name their task (the DataModule has several)
        self.dropped: dict[tuple[str, int], int] = {}
        self.repeats: dict[str, int] = {}  # task -> rate-choosing episodes that repeat an evaluated query
        self.results: dict[int, dict[str, float]] = {}  # the (first) task's, per shot count
        self.task_results: dict[str, dict[int, dict[str, float]]] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        initial = not getattr(pl_module.hparams, "pretrained", None) and not any(
            p.is_meta for p in pl_module.model.parameters())  # meta_init: drawn later; `seed` draws the baseline
        if self.untrained_baseline and stage == "fit" and initial:
            # setup runs before a checkpoint is restored: these are the initial weights (a resumed
            # run re-draws them from the same seed when it builds the module)
            self.untrained = copy.deepcopy(pl_module.model).cpu()

    def untrained_model(self, model: TransformerLM) -> TransformerLM:
        """The untrained baseline of `model`: the weights kept at the start of fit, else a fresh
        TransformerLM of the same config initialised from `seed` (the global RNG is untouched)."""
        if self.untrained is None or self.untrained.config != model.config:
            self.untrained = untrained_model(model, self.seed)
        return self.untrained

    def prepare(self, datamodule, block_size) -> None:
        """Build and check the held-out episodes of every task and shot count (see the class
        docstring); ValueError with one line naming what cannot work. Called by the Trainer as
        prepare(trainer, pl_module), or directly as prepare(datamodule, block_size)."""
        if isinstance(datamodule, pl.Trainer):
            datamodule, block_size = datamodule.datamodule, block_size.model.config.block_size
        if not isinstance(datamodule, HeldoutEpisodes):
            raise ValueError(
                f"ICLConversionCallback needs a DataModule with heldout_episodes(n_shots) (the HeldoutEpisodes "
                f"protocol of lit_icl.callbacks), got {type(datamodule).__name__}"
            )
        offered = list(datamodule.heldout_tasks()) if isinstance(datamodule, HeldoutTasks) else []
        unknown = sorted(set(self.tasks or []) - set(offered))
        if unknown:
            raise ValueError(f"ICLConversionCallback: tasks={self.tasks}: {unknown} not offered by "
                             f"{type(datamodule).__name__}; allowed: {offered}")
        self.name_tasks = len(offered) > 1
        self.episodes, self.select, self.dropped, self.repeats = {}, {}, {}, {}
        for task in [t for t in offered if self.tasks is None or t in self.tasks] or [""]:
            where = f"task {task!r}, " if task else ""
            for k in self.shots:
                try:
                    episodes, select = self._heldout(datamodule, task, k)
                except ValueError as err:
                    raise ValueError(f"ICLConversionCallback: {where}{k} shots: {_first_line(err)}") from err
                self.episodes[(task, k)] = self._fit(episodes, where, k, block_size, task)
                if select is not None:
                    self.select[(task, k)] = self._fit(select, where, k, block_size, task, selection=True)

    def _heldout(self, datamodule, task: str, k: int) -> tuple[Episodes, Episodes | None]:
        """Task `task`'s (the only one's when "") evaluated episodes of k shots and, with a grid of
        finetuning rates, the `select_episodes` after them that choose the rate."""
        def get(n):
            return datamodule.heldout_episodes(k, n, task=task) if task else datamodule.heldout_episodes(k, n)
        episodes = get(self.num_episodes)
        if self.lr_grid is None:
            return episodes, None
        # every shot count from the same n + select queries (and padding), so that the zero-shot
        # pass is shared by all of them
        more = get(len(episodes) + self.select_episodes)
        evaluated, select = more[: len(episodes)], more[len(episodes):]
        if k > 0 and task not in self.repeats:
            seen = {tuple(row.tolist()) for row in evaluated.query_inputs[0]}
            repeated = sum(tuple(row.tolist()) in seen for row in select.query_inputs[0])
            if repeated:  # a DataModule that cycles through too few held-out queries
                self.repeats[task] = repeated
                rank_zero_info(f"icl: {'task ' + repr(task) + ', ' if task else ''}{repeated} of the "
                               f"{len(select)} episodes that choose the finetuning rate repeat an evaluated query "
                               "(too few held-out queries for num_episodes + select_episodes)")
        return evaluated, select if k > 0 else None

    def _fit(self, episodes: Episodes, where: str, k: int, block_size: int, task: str,
             selection: bool = False) -> Episodes:
        """The episodes, checked: distinct candidates, prompts within block_size (or, with
        too_long="drop", their longest demonstrations dropped until they fit)."""
        candidates = episodes.candidates.tolist()
        if len(set(candidates)) != len(candidates):
            raise ValueError(
                f"ICLConversionCallback: {where}the candidate answers {candidates} are not distinct "
                "tokens (the label words must begin with different tokens)"
            )
        longest = int(episodes.prompt_lengths.max()) if len(episodes) else 0
        if longest > block_size and self.too_long == "error":
            raise ValueError(
                f"ICLConversionCallback: {where}{k} shots: the longest prompt is {longest} tokens, more "
                f"than block_size={block_size}; use fewer shots, a larger model.config.block_size, or "
                "the callback's too_long: drop (drops each episode's longest demonstrations until it fits)"
            )
        if longest <= block_size:
            return episodes
        try:
            episodes, dropped = episodes.drop_longest(block_size)
        except ValueError as err:
            raise ValueError(f"ICLConversionCallback: {where}{k} shots: {_first_line(err)}") from err
        if not selection:
            self.dropped[(task, k)] = dropped
            rank_zero_info(
                f"icl: {where}{k} shots: dropped {dropped} of {len(episodes) * k} demonstrations "
                f"(the longest of their episodes) so that every prompt fits block_size={block_size}"
            )
        return episodes

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: TransformerLM) -> tuple[dict, dict]:
        """The metrics of every task and shot count on this rank's share, not yet computed, and
        the phase times."""
        if not self.episodes:  # evaluate() called outside a Trainer's setup
            self.prepare(trainer.datamodule, model.config.block_size)
        seconds, collected = {}, {}
        tasks = list(dict.fromkeys(task for task, _ in self.episodes))
        for i, task in enumerate(tasks, 1):
            begun = time.perf_counter()
            collected[task] = self._run(trainer, model, task, seconds)
            if len(tasks) > 1:  # a line per finished task: a pretrained model takes minutes
                rank_zero_info(f"icl: {i}/{len(tasks)} {task} evaluated in {time.perf_counter() - begun:.1f} s")
        return collected, seconds

    def publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: tuple[dict, dict], start: float) -> None:
        collected, seconds = result
        self.task_results = {t: {k: m.compute() for k, m in per_k.items()} for t, per_k in collected.items()}
        self.results = next(iter(self.task_results.values()))
        named = {t: f"{t}/" if t and self.name_tasks else "" for t in self.task_results}
        scalars = {
            f"icl/{named[task]}{name}/k={k}": v
            for task, results in self.task_results.items() for k, row in results.items() for name, v in row.items()
        }
        scalars.update({f"icl/{named[t]}dropped_demos/k={k}": float(n) for (t, k), n in self.dropped.items()})
        scalars.update({f"icl/seconds/{phase}": v for phase, v in seconds.items()})
        scalars["icl/eval_seconds"] = time.perf_counter() - start
        scalars["icl/failed"] = 0.0
        top = self.results[max(self.results)]
        scalars.update({f"hp/{name}": v for name, v in top.items() if name.endswith("_acc")})
        pl_module.log_dict(scalars, sync_dist=False)  # torchmetrics already reduced across ranks
        rank_zero_info(f"icl: step {trainer.global_step}, {len(self.shots)} shot counts in {scalars['icl/eval_seconds']:.1f} s; " + "; ".join(
            f"{task + ' ' if task else ''}k={k} prompted {100 * r['prompted_acc']:.1f}%"
            for task, results in self.task_results.items() for k, r in results.items()))
        self._log_to_tensorboard(trainer, pl_module, top)

    @torch.no_grad()
    def _run(self, trainer: pl.Trainer, model: TransformerLM, task: str, seconds: dict[str, float]
             ) -> dict[int, ICLMetrics]:
        """The metrics of every shot count of one task on this rank's share of its episodes,
        updated but not yet computed (computing syncs across ranks). Phase times add up in `seconds`."""
        episodes = {k: e for (t, k), e in self.episodes.items() if t == task}
        select = {k: e for (t, k), e in self.select.items() if t == task}
        base = self.untrained_model(model).to(next(model.parameters()).device) if self.untrained_baseline else None
        return measure(model, episodes, finetune=self.finetune_kwargs, approximate=self.approximate,
                       batch_size=self.batch_size, untrained=base, seed=self.seed, rank=trainer.global_rank,
                       world_size=trainer.world_size, select=select if self.lr_grid else None, lr_grid=self.lr_grid,
                       check_batches=self.check_batches, seconds=seconds)

    def evaluate(self, trainer: pl.Trainer, model: TransformerLM, device=None, task: str | None = None
                 ) -> dict[int, dict[str, float]]:
        """Metrics per shot count of `task` (the first evaluated one when None) on this rank's
        share of the held-out episodes, synced across ranks. `device` is unused (the model's)."""
        if not self.episodes:
            self.prepare(trainer.datamodule, model.config.block_size)
        tasks = list(dict.fromkeys(t for t, _ in self.episodes))
        if task is not None and task not in tasks and tasks != [""]:
            raise ValueError(f"ICLConversionCallback.evaluate: task={task!r}; evaluated: {tasks}")
        key = tasks[0] if task is None or tasks == [""] else task
        return {k: m.compute() for k, m in self._run(trainer, model, key, {}).items()}

    def _log_to_tensorboard(self, trainer: pl.Trainer, pl_module: pl.LightningModule, top: dict) -> None:
        """The accuracy-vs-shots figure, and once the hparams view's hp/ metrics (rank zero)."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                from lit_icl.plots import accuracy_vs_shots

                for task, results in self.task_results.items():
                    tag = f"icl/{task + '/' if task and self.name_tasks else ''}accuracy_vs_shots"
                    logger.experiment.add_figure(tag, accuracy_vs_shots(results), global_step=trainer.global_step)
                if not self.declared_hparams:
                    metrics = {f"hp/{n}": v for n, v in top.items() if n.endswith("_acc")}
                    logger.log_hyperparams(pl_module.hparams, metrics, step=trainer.global_step)
                    self.declared_hparams = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" and not trainer.sanity_checking:  # lit-icl validate: the table now
            self.on_fit_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for task, results in self.task_results.items():
            open_vocabulary = next(e for (t, _), e in self.episodes.items() if t == task).open_vocabulary
            rank_zero_info((f"\n[{task}]" if task else "") + format_summary(results, open_vocabulary))


def format_summary(results: dict[int, dict[str, float]], open_vocabulary: bool = False) -> str:
    """Two fixed-width tables: accuracies per shot count (one column per prediction), then the
    comparison metrics and the conversion errors; then, in words, how much finetuning changed
    (and at which chosen rate)."""
    row = next(iter(results.values()))
    accs = [n for n in row if n.endswith("_acc") and not n.endswith("_untrained")]
    head = f"{'shots':>5}" + "".join(f"  {n.removesuffix('_acc').replace('_', ' '):>13}" for n in accs)
    scoring = "exact match of the answer's tokens" if open_vocabulary else "accuracy over the candidate answers"
    lines = ["", f"In-context learning on held-out episodes ({scoring})", head]
    for k, r in sorted(results.items()):
        lines.append(f"{k:>5}" + "".join(f"  {100 * r[n]:>12.1f}%" for n in accs))
    extra = [("ft_changed", "FT changed"), ("rec2ftp", "Rec2FTP"), ("simaou", "SimAOU"), ("simaou_random", "SimAOU(rand)"),
             ("simam_icl_ft", "SimAM(ICL,FT)"), ("simam_icl_zsl", "SimAM(ICL,ZSL)"),
             ("max_abs_logit_diff", "max|dlogit|"), ("rel_logit_err", "rel err")]
    extra += [(n, "rel err " + n.removeprefix("rel_logit_err_")) for n in row if n.startswith("rel_logit_err_")]
    extra = [(n, label) for n, label in extra if n in row]  # rows of older runs lack ft_changed
    head = f"{'shots':>5}" + "".join(f"  {label:>14}" for _, label in extra)
    lines += ["", head]
    for k, r in sorted(results.items()):
        lines.append(f"{k:>5}" + "".join(f"  {r[n]:>14.3g}" for n, _ in extra))
    lines.append("")
    for k, r in sorted(results.items()):
        if k == 0 or r.get("ft_changed", math.nan) != r.get("ft_changed", math.nan):  # absent or NaN: no line
            continue
        rate = f" at the chosen learning rate {r['finetune_lr']:g}" if "finetune_lr" in r else ""
        if r["ft_changed"] == 0:
            lines.append(f"{k} shots: finetuning{rate} changed no prediction: the finetuned model answers as the "
                         "zero-shot one (Rec2FTP is undefined)")
        else:
            lines.append(f"{k} shots: finetuning{rate} changed {100 * r['ft_changed']:.1f}% of the predictions")
    return "\n".join(lines)
