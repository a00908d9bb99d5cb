"""The ``lit-icl`` command line: LightningCLI over LitTransformerLM and the data modules.

    lit-icl fit --config configs/quickstart.yaml [--model.config.n_layer 4 ...]
    lit-icl validate|test|predict --config ... --ckpt_path checkpoints/last.ckpt

``--data`` takes any LightningDataModule subclass (``class_path``); its ``vocab_size`` is linked
into ``model.config.vocab_size`` when the classes are instantiated. Defaults (all overridable):
a TensorBoardLogger under ``lightning_logs/`` and a ModelCheckpoint, configured in its own
``checkpoint`` section, that writes ``checkpoints/last.ckpt``. Invalid values (a parse error or
a ValueError/TypeError from a constructor) end with a one-line ``error:`` message and exit 2.
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lit_icl.data  # noqa: F401  (registers the data modules as known --data subclasses)
from lit_icl.files import load_checkpoint
from lit_icl.module import LitTransformerLM, NonFiniteLossError

__all__ = ["LitICLCLI", "build_cli", "main"]

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "", "default_hp_metric": False},
    },
}
CHECKPOINT_DEFAULTS = {"checkpoint.dirpath": "checkpoints", "checkpoint.save_last": True}


class ConfigError(Exception):
    """A constructor rejected a configured value; reported without a traceback."""


class LitICLCLI(LightningCLI):
    """LightningCLI with the vocab link, a configurable ModelCheckpoint and one-line config errors."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise ConfigError(_root_message(err)) from err


def _root_message(err: BaseException) -> str:
    """First line of the innermost ValueError/TypeError in ``err``'s chain (jsonargparse wraps them)."""
    root, link = err, err
    while (link := link.__cause__ or link.__context__) is not None:
        if isinstance(link, (ValueError, TypeError)):
            root = link
    return (str(root) or type(root).__name__).splitlines()[0]


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
        if path and path not in ("last", "hpc", "best", "null") and not path.startswith("registry"):
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
