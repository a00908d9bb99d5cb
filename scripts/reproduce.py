#!/usr/bin/env python
"""The two papers' experiments, reproduced with one command each.

    python scripts/reproduce.py momentum  [--quick] --out DIR   # Dai et al. (2023), Table 6
    python scripts/reproduce.py icl-vs-ft [--quick] --out DIR   # Dai et al. (2023), Tables 2-5 + Deutch et al. (2024)
    python scripts/reproduce.py iclaa     [--quick] --out DIR   # Chen et al. (2024), ICLAA on a pretrained LM
    python scripts/reproduce.py icl-emergence [--quick] --out DIR  # Olsson et al. (2022): ICL score per kind
    python scripts/reproduce.py readme --out DIR                # README.md's "Reproducing the papers" from DIR/*.json

Each experiment writes DIR/NAME.json (every number, with the config and seed of each run),
DIR/NAME.md (setup, our table next to the paper's, what differs and why) and DIR/NAME*.png.
The JSON is written after every finished run, and a run already in it is not redone when the
command is run again (after an interruption, or to add seeds); a changed configuration starts
afresh. `--quick` is a smoke version on a tiny model and self-written data (no download), what
the tests run; without it the experiments use the named real sources (`lit-icl data list`).
The experiments are lit_icl.experiments.momentum, .icl_vs_ft, .iclaa and .icl_emergence.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from lit_icl.experiments.reproduce import EXPERIMENTS, run_experiment, write_readme

README = Path(__file__).resolve().parents[1] / "README.md"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=[*EXPERIMENTS, "readme"], help="experiment to run, or readme")
    parser.add_argument("--out", required=True, help="output folder (scripts/results for the README's)")
    parser.add_argument("--quick", action="store_true", help="tiny model and self-written data: seconds, no download")
    parser.add_argument("--readme", default=str(README), help="readme: the file whose section is rewritten")
    parser.add_argument("--seeds", type=int, nargs="+", help="momentum, icl-emergence: training seeds (default 1 2 3; 1 2)")
    parser.add_argument("--steps", type=int, help="momentum, icl-emergence: optimizer steps per run")
    parser.add_argument("--eta", type=float, help="momentum: eta of momentum attention (default 0.5)")
    parser.add_argument("--episodes", type=int, help="icl-vs-ft: held-out episodes per task and shot count (default 200); "
                        "icl-emergence: held-out documents (default 128)")
    parser.add_argument("--shots", type=int, nargs="+", help="icl-vs-ft: shot counts (default 0 1 2 4 8)")
    parser.add_argument("--tasks", nargs="+", help="icl-vs-ft: tasks (default: the 13 function tasks, mr and bbc)")
    parser.add_argument("--lr-grid", type=float, nargs="+", help="icl-vs-ft: the finetuning learning rates; each task and shot count takes the one with the lowest answer loss")
    parser.add_argument("--lr-episodes", type=int, help="icl-vs-ft: held-out episodes (after the evaluated ones) that choose the rate")
    parser.add_argument("--batch-size", type=int, help="icl-vs-ft: episodes per batched finetuning (default 4; "
                        "memory grows with it: 8 at 8 shots needed over 20 GB with smollm2-135m)")
    parser.add_argument("--pairs", type=int, help="iclaa: (context, prompt) pairs (default 100)")
    parser.add_argument("--context", type=int, help="iclaa: context tokens per pair (default 256)")
    args = parser.parse_args(argv)
    for name in ("steps", "episodes", "lr_episodes", "batch_size", "pairs", "context"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    try:
        if args.name == "readme":
            write_readme(Path(args.out), Path(args.readme))
        else:
            run_experiment(args.name, args, command="python scripts/reproduce.py " + shlex.join(argv))
    except ValueError as err:
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
