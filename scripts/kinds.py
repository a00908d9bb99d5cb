#!/usr/bin/env python
"""Which attention kind learns in-context recall fastest at equal budget.

    python scripts/kinds.py [--quick] --out DIR   # train the quickstart once per kind, write DIR/kinds.*
    python scripts/kinds.py readme --out DIR      # README.md's kind table from DIR/kinds.json

Each kind trains the quickstart (associative recall) through `lit-icl fit` with its overlay
(configs/<kind>.yaml) for the same steps on the same data order; the table holds the first step
at which prompted accuracy with 8 demonstrations reaches 90%, the final accuracies and the
training throughput. DIR/kinds.json holds every number with each run's config; a finished run
is not redone when the command is run again. `--quick` is a seconds-long smoke version (tiny
model, 4 steps), what the tests run. The experiment is lit_icl.experiments.kinds.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from lit_icl.experiments.kinds import KINDS, run, table, write_readme

README = Path(__file__).resolve().parents[1] / "README.md"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", choices=["run", "readme"], default="run")
    parser.add_argument("--out", required=True, help="output folder (scripts/results for the README's)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 steps: seconds (what the tests run)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), help="only these kinds (default: all)")
    parser.add_argument("--readme", default=str(README), help="readme: the file whose table is rewritten")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    try:
        if args.name == "readme":
            write_readme(Path(args.out), Path(args.readme))
        else:
            data = run(Path(args.out), args.quick, args.kinds, command="python scripts/kinds.py " + shlex.join(argv))
            print("\n".join(table(data)))
    except ValueError as err:
        print(f"kinds: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
