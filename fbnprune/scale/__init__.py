"""Scale: what lets fbnprune run where the tokens x neurons matrix does not fit in memory.

``store``: the chunked on-disk activation store (zarr; float16, bfloat16 or float32; one
array per layer, chunks of tokens x one layer), its writer and its readers (numpy, dask).
``collect``: calibration that writes straight into the store. ``discover``: group ICA out of
core on dask (centring and randomized PCA with ``dask.array``, FastICA in the reduced space
with ``fbnprune.discover.ica_maps``), on the local threaded scheduler within a memory budget
or on a ``dask.distributed`` cluster.
"""
