"""Stage 2, discover: functional networks by ICA over a tokens x units matrix.

``group_ica`` (FastICA over the whole matrix), ``layer_ica`` (one decomposition per layer),
``dask_ica`` (the out-of-core twin: group ICA on dask), ``fitting`` (a fit chosen by the
recipe, and the network scores the select stage reads), ``stage`` (the run's stage).
"""

from fbnprune.moved import forward

__getattr__ = forward(__name__)
