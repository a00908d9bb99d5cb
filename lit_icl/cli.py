"""The ``lit-icl`` command line: LightningCLI over LitTransformerLM and the data modules.

    lit-icl fit --config configs/quickstart.yaml [--model.config.n_layer 4 ...]
    lit-icl validate|test|predict --config ... --ckpt_path checkpoints/last.ckpt

``--data`` takes any LightningDataModule subclass (``class_path``); its ``vocab_size`` is linked
into ``model.config.vocab_size`` when the classes are instantiated. Invalid values (a parse error
or a ValueError/TypeError from a constructor) end with a one-line ``error:`` message and exit 2.
With ``--model.pretrained DIR`` (a local Hugging Face gpt2/llama directory) the model is the
checkpoint's: the linked vocab_size must not exceed its vocabulary, and other
``--model.config.*`` values must agree with it.

One folder per run. Every ``fit`` is a run with a name (``--run_name``; by default the next free
``version_N``): its checkpoints go to ``checkpoints/<run>/`` (``last.ckpt`` and the periodic
ones), its TensorBoard events, ``config.yaml`` and ``tokenizer.json`` to ``lightning_logs/<run>/``.
``--ckpt_path last`` resumes the run ``--run_name`` names, or without one the run whose
``last.ckpt`` is newest, into the same folders. A new run never writes into a folder that holds
another run's checkpoints: naming an existing run without ``--ckpt_path`` is refused at start.
An explicit ``--checkpoint.dirpath`` is used as it is.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lit_icl.data  # noqa: F401  (registers the data modules as known --data subclasses)
from lit_icl.errors import first_line
from lit_icl.files import load_checkpoint
from lit_icl.module import LitTransformerLM, NonFiniteLossError
from lit_icl.strategies import is_sharded_checkpoint

__all__ = ["LitICLCLI", "build_cli", "main"]

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "", "default_hp_metric": False},
    },
}
CHECKPOINT_DEFAULTS = {"checkpoint.save_last": True}
RUNS_DIR = "checkpoints"  # checkpoints/<run_name>/ per run


def next_run_name(*roots: str) -> str:
    """``version_N`` with N one past the largest used under any of ``roots``."""
    used = [int(m[1]) for root in roots if os.path.isdir(root) for name in os.listdir(root)
            if (m := re.fullmatch(r"version_(\d+)", name))]
    return f"version_{max(used, default=-1) + 1}"


def latest_run(root: str = RUNS_DIR) -> Optional[str]:
    """The run under ``root`` whose ``last.ckpt`` was written last, or None."""
    lasts = sorted(Path(root).glob("*/last.ckpt"), key=lambda p: p.stat().st_mtime) if os.path.isdir(root) else []
    return lasts[-1].parent.name if lasts else None


class ConfigError(Exception):
    """A constructor rejected a configured value; reported without a traceback."""


class LitICLCLI(LightningCLI):
    """LightningCLI with the vocab link, a configurable ModelCheckpoint and one-line config errors."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.add_argument("--run_name", type=Optional[str], default=None,
                            help="name of the run: checkpoints/<run_name>/ and lightning_logs/<run_name>/ "
                                 "(default: the next free version_N; with --ckpt_path last, the newest run)")
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Resolve the run's name and point the checkpoint folder and the logger at it."""
        if self.subcommand != "fit":
            return
        config = self.config["fit"]
        run, resume = config.get("run_name"), config.get("ckpt_path") == "last"
        if config.get("checkpoint.dirpath") is None:
            if run is None:
                run = latest_run() if resume else next_run_name(RUNS_DIR, _log_root(config) or RUNS_DIR)
                if run is None:
                    raise ConfigError(f"--ckpt_path last: no run under {RUNS_DIR}/ has a last.ckpt to resume")
            folder = os.path.join(RUNS_DIR, run)
            has_checkpoints = any(Path(folder).glob("*.ckpt"))
            if resume and not os.path.exists(os.path.join(folder, "last.ckpt")):
                raise ConfigError(f"--ckpt_path last: run {run!r} has no {folder}/last.ckpt to resume")
            if not resume and has_checkpoints:
                raise ConfigError(f"run {run!r} already has checkpoints in {folder}/; resume it with --ckpt_path "
                                  "last, or choose another --run_name")
            config["checkpoint.dirpath"] = folder
        logger = config.get("trainer.logger")
        if run is not None and getattr(logger, "class_path", "").endswith(("TensorBoardLogger", "CSVLogger")):
            if logger.init_args.get("version") is None:
                logger.init_args["version"] = run
        self.run_name = run

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise ConfigError(_root_message(err)) from err

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with a progress bar that does not print "Epoch 0/-2" for step-bounded runs."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        own_bar = any("ProgressBar" in type(c).__name__ for c in trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar", True) is not False and StepsProgressBar is not None and not own_bar:
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": [StepsProgressBar()]}
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """Say where the run's checkpoints and logs are."""
        log_dir = self.trainer.log_dir  # a collective under DDP: asked on every rank
        checkpoint = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and checkpoint is not None and checkpoint.dirpath:
            last = os.path.join(checkpoint.dirpath, "last.ckpt")
            where = f"lit-icl: run {getattr(self, 'run_name', None) or '-'}: checkpoints in {checkpoint.dirpath}/"
            if os.path.exists(last):
                where += f" (last: {last})"
            if log_dir:
                where += f"; logs in {log_dir}/"
            print(where)


def _log_root(config) -> Optional[str]:
    """The directory under which the configured logger makes its version folders."""
    logger = config.get("trainer.logger")
    args = getattr(logger, "init_args", None)
    if args is None:
        return None
    return os.path.join(args.get("save_dir") or ".", args.get("name") or "")


try:  # Lightning's RichProgressBar titles a step-bounded run (max_epochs=-1) "Epoch 0/-2"
    from lightning.pytorch.callbacks import RichProgressBar
    import rich  # noqa: F401

    class StepsProgressBar(RichProgressBar):
        """RichProgressBar whose title shows "/<last epoch>" only when the run has one."""

        def _get_train_description(self, current_epoch: int) -> str:
            description = f"Epoch {current_epoch}"
            if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
                description += f"/{self.trainer.max_epochs - 1}"
            return description + " " * max(0, len(self.validation_description) - len(description))
except ImportError:  # rich missing: Lightning's TQDM bar says "Epoch N" itself
    StepsProgressBar = None


def _root_message(err: BaseException) -> str:
    """First line of the innermost ValueError/TypeError in ``err``'s chain (jsonargparse wraps them)."""
    root, link = err, err
    while (link := link.__cause__ or link.__context__) is not None:
        if isinstance(link, (ValueError, TypeError)):
            root = link
    return first_line(root)


def build_cli(args: list[str] | None = None, run: bool = True) -> LitICLCLI:
    """The ``lit-icl`` LightningCLI; ``run=False`` parses a config (no subcommand) and instantiates only."""
    return LitICLCLI(
        LitTransformerLM,
        pl.LightningDataModule,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs={"prog": "lit-icl", "exit_on_error": False},  # main() prints one line
        save_config_kwargs={"overwrite": True},  # a resumed run rewrites its config.yaml
        args=args,
        run=run,
    )


def check_ckpt_path(argv: list[str]) -> None:
    """Load a --ckpt_path file once with weights_only=True before LightningCLI reads it: a
    truncated, foreign or code-carrying checkpoint becomes a one-line error, never a traceback
    (and never runs pickled code)."""
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--ckpt_path=") else argv[i + 1] if arg == "--ckpt_path" and i + 1 < len(argv) else None
        if path and path not in ("last", "hpc", "best", "null") and not path.startswith("registry") \
                and not is_sharded_checkpoint(path):  # a sharded one is read in place by its strategy
            load_checkpoint(path)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lit-icl`` (``args`` defaults to ``sys.argv[1:]``): fit, validate, test
    and predict through LightningCLI; convert, generate and data from `lit_icl.commands`."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in ("convert", "generate", "data"):
        from lit_icl.commands import run

        run(argv[0], argv[1:])
        return
    try:
        check_ckpt_path(argv)
        build_cli(args)
    except ConfigError as err:
        print(f"lit-icl: error: {err}", file=sys.stderr)
        sys.exit(2)
    except ArgumentError as err:  # a bad option or value on the command line or in a config
        message = " ".join(str(err).split())
        print(f"lit-icl: error: {message} (lit-icl fit --help lists the options)", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        if os.environ.get("LIT_ICL_DEBUG"):
            raise
        print(f"lit-icl: error: {_root_message(err)} (LIT_ICL_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(1 if isinstance(err, NonFiniteLossError) else 2)


if __name__ == "__main__":
    main()
