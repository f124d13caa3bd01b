"""Stage 5, check: a sliced model computes what the masked model computes.

``compare`` (logits of models on the same tokens, in float64), ``reload`` (a staged
checkpoint reloaded and compared), ``layer_check`` (the out-of-core twin: one decoder block
at a time), ``stage`` (the run's stage).
"""

from fbnprune.moved import forward

__getattr__ = forward(__name__)
