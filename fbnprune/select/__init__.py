"""Stage 3, select: which units each layer keeps, and the fill of the rest.

``selection`` (unit scores and the allocation of an exact budget), ``calibration`` (what
selection reads of a run), ``sensitivity`` (per-layer allocation), ``refit`` and
``sequential`` (least-squares fills), ``budget`` (the smallest budget that keeps a target),
``planning`` (a plan from scores and settings), ``stage`` (the run's stage).
"""

from fbnprune.moved import forward

__getattr__ = forward(__name__)
