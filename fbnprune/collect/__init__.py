"""Stage 1, collect: MLP unit values per real token of each task's calibration text.

``activations`` (the tokens x units matrix in memory), ``packing`` (short samples share
rows), ``store`` and ``to_store`` (the out-of-core twin: a chunked zarr matrix, filled layer
by layer), ``stage`` (the run's stage).
"""

from fbnprune.moved import forward

__getattr__ = forward(__name__)
