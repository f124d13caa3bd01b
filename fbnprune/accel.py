"""Processes of one ``accelerate launch``: the accelerator healing trains through, and what
the processes agree on (a stop, a mean loss, a message from the main process).

Under ``accelerate launch`` (or ``torchrun``) several processes run the same command; one
plain ``fbnprune`` process is a group of one, where every helper here is a no-op.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

# the other processes wait at a broadcast while the main one runs the stages before heal
WAIT = timedelta(hours=12)


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(*, cpu: bool | None = None) -> Accelerator:
    """The accelerator of this process group, configured by the launcher's environment
    (``accelerate launch --config_file``: FSDP, mixed precision). ``cpu``: train on the CPU
    (by default when torch sees no accelerator; several CPU processes then use gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if cpu is None:
        cpu = not torch.accelerator.is_available()
    return Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=WAIT)])


def is_fsdp(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return bool(accelerator.distributed_type == DistributedType.FSDP)


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` is true in any process (all processes must call it)."""
    if accelerator.num_processes == 1:
        return flag
    votes = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
    return bool(votes.item() > 0)


def mean_over_processes(accelerator: Accelerator, total: float, count: int) -> float:
    """``sum(totals) / sum(counts)`` over the processes; ``total / count`` in one."""
    if accelerator.num_processes == 1:
        return total / count
    pair = torch.tensor([total, float(count)], dtype=torch.float64, device=accelerator.device)
    summed = accelerator.reduce(pair, "sum")
    return float(summed[0] / summed[1])


def broadcast(accelerator: Accelerator, message: Any = None) -> Any:
    """The main process's ``message``, in every process (a no-op in one)."""
    if accelerator.num_processes == 1:
        return message
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([message], from_process=0)[0]


class Launch:
    """This process's place among those of one launch: its accelerator, and the message the
    main process sends the others once it reaches the heal stage (None: nothing to train)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.told = False

    @property
    def processes(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def tell(self, message: dict[str, Any] | None) -> None:
        """Send ``message`` to the other processes (the main process, once)."""
        if self.is_main and not self.told:
            self.told = True
            broadcast(self.accelerator, message)

    def listen(self) -> dict[str, Any] | None:
        """The main process's message (the other processes wait for it)."""
        message: dict[str, Any] | None = broadcast(self.accelerator)
        return message
