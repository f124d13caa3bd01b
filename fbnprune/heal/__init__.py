"""Stage 7, heal: distil the original into the pruned model.

``distill`` (the teacher's targets and the loss), ``train`` (the training loop, through
``fbnprune.accel``), ``state`` (its log and resumable state), ``launch`` (the student from
disk, the other processes of a launch), ``stage`` (the run's stage).
"""

from fbnprune.moved import forward

__getattr__ = forward(__name__)
