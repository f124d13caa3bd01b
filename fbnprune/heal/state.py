"""Healing's record and training state: the log (``HealLog``), the best weights early
stopping keeps, the resume file, the loss plot."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fbnprune.io import atomic_file, save_figure


@dataclass
class HealLog:
    """What happened during healing (``heal/log.json`` in a run directory)."""

    method: str
    trainable_parameters: int
    steps: int = 0
    seconds: float = 0.0
    stopped_by: str = ""
    tokens: int = 0  # real tokens trained on
    best_step: int | None = None  # the step whose weights were kept (early stopping)
    train_loss: list[float] = field(default_factory=list)  # one per step
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    # (step, held-out accuracy under verdict.scoring), where the run scores its task
    validation_accuracy: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int | None = None
    processes: int = 1  # each step trains on one batch per process
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EarlyStopping:
    """Keeps a copy of the trained parameters at the best validation loss; says when the
    loss has not improved for ``patience`` evaluations; puts the best weights back."""

    def __init__(
        self, params: list[nn.Parameter], patience: int | None, history: list[tuple[int, float]]
    ) -> None:
        self.params, self.patience = params, patience
        self.best_loss = min((v for _, v in history), default=math.inf)
        self.best_step: int | None = None
        self.best: list[torch.Tensor] | None = None
        self.since = 0

    def update(self, step: int, loss: float) -> bool:
        """Record a validation loss; True when training should stop."""
        if self.patience is None:
            return False
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.since = loss, step, 0
            self.best = [p.detach().clone() for p in self.params]
            return False
        self.since += 1
        return self.since >= self.patience

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to choose as this one would: the best loss, its step and
        weights, and the evaluations since."""
        return {
            "loss": self.best_loss,
            "step": self.best_step,
            "since": self.since,
            "params": self.best,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_step = state["loss"], state["step"]
        self.since, self.best = state["since"], state["params"]

    def restore(self) -> int | None:
        """Copy the best parameters back (when early stopping is on); their step."""
        if self.best is None:
            return None
        with torch.no_grad():
            for param, saved in zip(self.params, self.best, strict=True):
                param.copy_(saved)
        return self.best_step


def save_state(
    file: Path,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    step: int,
    log: HealLog,
    settings: str,
    resume: dict[str, Any],
) -> None:
    """The training state after ``step``: weights, optimizer, log, and ``resume`` (the data
    order's generator and the rest of its epoch, the global RNG, the best weights so far), so
    that a resumed run trains on what the uninterrupted one would have."""
    with atomic_file(file) as tmp:
        torch.save(
            {
                **resume,
                "settings": settings,
                "n_params": log.trainable_parameters,
                "step": step,
                "params": [p.detach().clone() for p in params],
                "optimizer": optimizer.state_dict(),
                "train_loss": log.train_loss,
                "tokens": log.tokens,
                "validation": log.validation,
                "validation_accuracy": log.validation_accuracy,
            },
            tmp,
        )


def load_state(
    file: Path | None, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, settings: str
) -> dict[str, Any] | None:
    """Put the state saved in ``file`` for the same ``settings`` and parameter count back
    into ``params`` and ``optimizer``; the saved step and log fields (None: nothing to
    resume)."""
    if file is None or not file.is_file():
        return None
    state = torch.load(file, weights_only=False)
    if state["settings"] != settings or state["n_params"] != sum(p.numel() for p in params):
        return None
    if "order" not in state:  # an older version's state: it cannot resume exactly
        return None
    for param, saved in zip(params, state["params"], strict=True):
        param.data.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    return state


def plot_loss(logs: dict[str, HealLog], file: Path, *, title: str = "healing") -> Path:
    """Training loss per step (smoothed), validation loss and (right axis) held-out task
    accuracy of one or more heal runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    accuracy_ax = None
    for name, log in logs.items():
        losses = torch.tensor(log.train_loss)
        if len(losses) == 0:
            continue
        window = max(1, len(losses) // 25)  # never longer than the losses
        smooth = losses.unfold(0, window, 1).mean(-1)
        (line,) = ax.plot(
            range(window, window + len(smooth)), smooth.tolist(), label=f"{name} train"
        )
        if log.validation:
            steps, values = zip(*log.validation, strict=True)
            ax.plot(steps, values, "o--", color=line.get_color(), label=f"{name} held-out")
        if log.validation_accuracy:
            if accuracy_ax is None:
                accuracy_ax = ax.twinx()
                accuracy_ax.set_ylabel("held-out accuracy (dotted)")
                accuracy_ax.set_ylim(0, 1)
            steps, values = zip(*log.validation_accuracy, strict=True)
            accuracy_ax.plot(steps, values, "s:", color=line.get_color(), label=f"{name} accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss: KL(teacher || student), top-k + rest (+ label loss)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, file)
