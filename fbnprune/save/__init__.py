"""Stage 6, save: sliced models as safetensors checkpoints that stock transformers loads.

``checkpoint`` (write one, padded or compact), ``streamed`` (the out-of-core twin: one
decoder block at a time from the original's shards), ``checked`` (the one way a run
writes a checkpoint: stage, reload, parity, publish), ``stage`` (the run's stage).
"""

from fbnprune.moved import forward

__getattr__ = forward(__name__)
