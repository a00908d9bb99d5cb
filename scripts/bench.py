#!/usr/bin/env python
"""Benchmark of lit_icl's performance claims: a markdown table on stdout, JSON on --out.

    .venv/bin/python scripts/bench.py [--quick] [--out bench.json] [--readme README.md]

Every comparison is a ratio measured in this one process, the contenders alternating over
rounds; the sections (attention kernels, matmul rate, a training step per attention kind,
conversion vs finetuning, inference per query, the recurrent family's ops) and their targets
are described in lit_icl.experiments.bench.
--quick shrinks every shape for a smoke run (a test runs it); its targets are not meaningful.
--sections runs only the named sections (e.g. `--sections recurrent`).
"""
from __future__ import annotations

import argparse
import json
import sys

from lit_icl.experiments import bench


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a smoke run of every section")
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's, one per core)")
    parser.add_argument("--sections", nargs="+", choices=list(bench.SECTIONS), default=list(bench.SECTIONS),
                        help="run only these sections (default: all)")
    parser.add_argument("--readme", help="also write the table into this file (README.md) between its bench markers")
    args = parser.parse_args(argv)
    cfg = bench.QUICK if args.quick else bench.FULL
    r = bench.run(cfg, args.sections, quick=args.quick, threads=args.threads,
                  command=" ".join(["python", "scripts/bench.py", *argv]))
    print(bench.table(cfg, r))
    if args.readme:
        bench.write_readme(args.readme, cfg, r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1, default=str)
    return r


if __name__ == "__main__":
    main()
