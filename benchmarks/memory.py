"""Each stage's peak memory against what it must hold, for a recipe, in one run.

    python benchmarks/memory.py recipes/demo.yaml --out runs/memory      # run, then the table
    python benchmarks/memory.py --report-only runs/demo                  # the table of a run
    python benchmarks/memory.py recipes/demo.yaml --out runs/memory \
        --set heal.activation_checkpointing=true                        # a setting changed

Peaks are the process's resident memory (RSS) sampled every 50 ms while each stage runs
(``fbnprune.rundir.runner.measure``); what a stage must hold is read from the run's files
(``fbnprune.rundir.memory``): the model's bytes, each task's float32 activation matrix, the
teacher's healing targets. The run is the pipeline's own (``fbnprune.run``), so the figures
are what a user's run reaches, in one process; the same table is in ``run.json`` ("memory").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fbnprune.rundir.memory import memory_report, memory_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", help="the recipe to run")
    parser.add_argument("--out", type=Path, help="the run directory")
    parser.add_argument("--until", default="verdict", help="the last stage to run")
    parser.add_argument("--report-only", type=Path, metavar="RUN", help="a finished run")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="as fbnprune run's"
    )
    args = parser.parse_args()
    if args.report_only is not None:
        run_dir = args.report_only
    else:
        if args.recipe is None or args.out is None:
            parser.error("give a recipe and --out, or --report-only RUN")
        from fbnprune import run

        run(args.recipe, args.out, until=args.until, progress=False, overrides=args.set)
        run_dir = args.out
    print(memory_table(memory_report(run_dir)), end="")


if __name__ == "__main__":
    main()
