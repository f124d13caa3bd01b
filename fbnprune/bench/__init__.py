"""``fbnprune bench``: selectors x budgets x fills (x healing) against the original.

``run_bench`` scores the grid of ``recipe.bench`` in one process (``fbnprune.bench.run``);
``fbnprune.bench.report`` turns the rows into ``bench/results.json``, ``bench/results.md``
and one PNG per task.
"""

from fbnprune.bench.report import write_report
from fbnprune.bench.run import Variant, grid, run_bench
from fbnprune.rundir.layout import BENCH_DIR

__all__ = ["BENCH_DIR", "Variant", "grid", "run_bench", "write_report"]
