"""``fbnprune bench``: selectors x budgets x fills (x healing) against the original.

``fbnprune.bench.grid`` lists the variants of ``recipe.bench`` and builds their plans;
``run_bench`` scores them in one process (``fbnprune.bench.scoring``); ``fbnprune.bench.summary``
turns the rows into ``bench/results.json``, ``bench/results.md`` and one PNG per task.
"""

from fbnprune.bench.grid import Variant, grid
from fbnprune.bench.scoring import run_bench
from fbnprune.bench.summary import write_report
from fbnprune.rundir.layout import BENCH_DIR

__all__ = ["BENCH_DIR", "Variant", "grid", "run_bench", "write_report"]
