"""Healing: knowledge distillation from the original model into the pruned one.

The teacher (the original model) reads the task's calibration text once; its top-k next-token
log-probabilities per position are kept (``TeacherTargets``). The student (the sliced model)
is then trained to match them: KL divergence between the teacher's distribution, coarsened
to its top-k tokens plus one bucket holding the remaining mass, and the student's on the
same k+1 buckets. With k = 64 the bucket holds well under 1% of the teacher's mass on
average, and the targets of 25k tokens fit in a few MiB instead of the 5 GiB that full
logits over a 49k vocabulary would need.

What is trained (``HealConfig.method``):
- ``full``: the weights of ``HealConfig.modules`` themselves (default: the MLPs, the only
  part pruning changed). A unit that was sliced to zero width stays gone; in the padded
  layout a padding unit has zero weights on both sides, where every gradient is zero, so it
  stays exactly zero.
- ``lora``: low-rank adapters (``peft``) on the same linear layers, merged into the weights
  at the end, so the healed model has the sliced model's shapes and is saved by the same
  code. Use it with the compact layout: an adapter would bring padding units to life.

Never train on held-out text: ``heal_model`` takes the texts it is given, and the pipeline
and the benchmark give it the calibration documents only. Held-out prompts may be passed as
``validation`` to watch the loss, never to train.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fbnprune.accel import any_process, is_fsdp, make_accelerator, mean_over_processes
from fbnprune.heal.distill import HealError, Targets, TeacherTargets, heal_loss, prepare_targets
from fbnprune.heal.state import EarlyStopping, HealLog, load_state, plot_loss, save_state
from fbnprune.models.adapters import get_adapter
from fbnprune.recipe import HealConfig

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import PreTrainedModel

__all__ = ["HealError", "HealLog", "heal_model", "plot_loss", "trainable_linears"]

logger = logging.getLogger(__name__)


def trainable_linears(model: PreTrainedModel, modules: str) -> dict[str, nn.Module]:
    """Name -> module of the linear layers healing trains: the MLPs' (``mlp``) or every
    linear layer of the decoder (``all``; embeddings and the LM head stay frozen)."""
    adapter = get_adapter(model)
    out: dict[str, nn.Module] = {}
    for i, layer in enumerate(adapter.get_layers(model)):
        scope = adapter.get_mlp(layer) if modules == "mlp" else layer
        for name, module in scope.named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                out[f"layer{i}.{name}"] = module
    if not out:
        raise HealError(f"no linear layers to train in {type(model).__name__}")
    return out


def _lora_targets(model: PreTrainedModel, modules: str) -> list[str]:
    """Fully qualified names of the linear layers LoRA adapts."""
    wanted = {id(m) for m in trainable_linears(model, modules).values()}
    return [name for name, m in model.named_modules() if id(m) in wanted]


def _prepare(
    model: PreTrainedModel, cfg: HealConfig
) -> tuple[PreTrainedModel | PeftModel, list[nn.Parameter]]:
    """Freeze everything but what healing trains; wrap with LoRA adapters if asked."""
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.method == "full":
        params = [p for m in trainable_linears(model, cfg.modules).values() for p in m.parameters()]
        for param in params:
            param.requires_grad_(True)
        return model, params
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is in the heal extra
        raise HealError("method 'lora' needs peft: pip install 'fbnprune[heal]'") from exc
    # peft annotates lora_alpha as int, but uses it as a float (the scale lora_alpha / r)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=0.0,
        target_modules=_lora_targets(model, cfg.modules),
        bias="none",
    )
    wrapped = get_peft_model(model, lora)
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def _finish(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """Merge LoRA adapters (a peft model) into the weights; unfreeze nothing, evaluation
    mode."""
    from transformers import PreTrainedModel

    merged = model if isinstance(model, PreTrainedModel) else model.merge_and_unload()
    if merged.is_activation_checkpointing:
        merged.activation_checkpointing_disable()
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged.eval()


def _lr_at(step: int, cfg: HealConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warmup = max(1, int(cfg.warmup * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def heal_model(
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    tokenizer: Any,
    texts: Sequence[str],
    cfg: HealConfig,
    *,
    validation: Sequence[str] = (),
    questions: Sequence[bool] | None = None,
    validation_questions: Sequence[bool] | None = None,
    answers: Sequence[str | None] | None = None,
    validation_answers: Sequence[str | None] | None = None,
    targets: Targets | None = None,
    state_file: Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    accelerator: Accelerator | None = None,
    reload: Callable[[], PreTrainedModel] | None = None,
    task_accuracy: Callable[[nn.Module], float] | None = None,
) -> tuple[PreTrainedModel, HealLog]:
    """Distil ``teacher`` into ``student`` on ``texts`` (calibration text only).

    Training runs through ``accelerator`` (by default one made for the student's device:
    one process, where the result is the plain torch loop's, bit for bit). Under
    ``accelerate launch`` every process calls this with the same targets; each step, the
    N processes train on N batches (the one at their rank), and the losses logged are
    their means.

    Args:
        student: the pruned model; trained in place (its dtype must be a float).
        teacher: the original model; only run forward (None when ``targets`` are given).
        tokenizer: shared by both (None when ``targets`` are given).
        texts: training text (the task's calibration prompts).
        cfg: steps, time budget, learning rate, method, batch shape.
        validation: held-out text whose loss is logged every ``cfg.eval_every`` steps (and
            drives early stopping with ``cfg.patience``).
        questions, validation_questions: per text, whether it is a multiple-choice prompt
            whose last position (the answer's) weighs ``cfg.answer_weight``.
        answers, validation_answers: per text, its gold answer text or None; with
            ``cfg.label_weight`` the answer is appended and its cross-entropy added to the
            loss (training and validation alike, so early stopping follows the task).
        targets: the teacher's (training, validation) targets from ``prepare_targets``,
            to share them between several students of one teacher.
        state_file: where training state is checkpointed every ``cfg.checkpoint_every``
            steps; an existing state for the same settings is resumed from (not under FSDP).
        on_step: called with (step, loss) after every step.
        accelerator: the process group's (``fbnprune.accel.make_accelerator``).
        reload: under FSDP, a fresh copy of the student (from disk) into which the main
            process gathers the trained weights.
        task_accuracy: the held-out accuracy of a model on the task, logged beside every
            validation loss (one process only; it does not steer training).

    Returns:
        The healed model (LoRA merged) and its log. Under FSDP only the main process's
        model is whole.
    """
    if targets is None:
        if teacher is None:
            raise HealError("heal_model needs the teacher or its targets")
        targets = prepare_targets(
            teacher,
            tokenizer,
            texts,
            cfg,
            validation=validation,
            questions=questions,
            validation_questions=validation_questions,
            answers=answers,
            validation_answers=validation_answers,
            progress=progress,
        )
    train_targets, val_targets = targets
    if accelerator is None:
        accelerator = make_accelerator(cpu=student.device.type == "cpu")
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(cfg.seed)
    model, params = _prepare(student, cfg)
    if cfg.activation_checkpointing:
        student.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_params = sum(p.numel() for p in params)
    log = HealLog(
        cfg.method,
        n_params,
        processes=world,
        settings={**cfg.model_dump(), "label_weight": cfg.label_weight},
    )
    settings_key = cfg.model_dump_json() + (f" x{world} processes" if world > 1 else "")
    if is_fsdp(accelerator):
        if state_file is not None:
            logger.warning("heal: no training state is checkpointed under FSDP")
        state_file = None
    start_step = 0
    state = load_state(state_file, params, optimizer, settings_key)
    order = torch.Generator().manual_seed(cfg.seed)  # the data order
    epoch: list[int] = []  # what is left of the current pass over the data
    if state is not None:
        start_step, log.train_loss = state["step"], state["train_loss"]
        log.validation_accuracy = state.get("validation_accuracy", [])
        log.validation, log.resumed_from = state["validation"], state["step"]
        log.tokens = state.get("tokens", 0)
        order.set_state(state["order"])
        epoch = list(state["epoch"])
        torch.set_rng_state(state["rng"])
        logger.info("heal: resuming from step %d (%s)", start_step, state_file)
    model, optimizer = accelerator.prepare(model, optimizer)
    if is_fsdp(accelerator):  # sharded parameters replace the student's
        params = [p for p in model.parameters() if p.requires_grad]
    main = accelerator.is_main_process

    def validate() -> float:
        loss = _validation_loss(model, val_targets, cfg, accelerator)
        if task_accuracy is not None and world == 1:
            step = len(log.train_loss)
            log.validation_accuracy.append((step, task_accuracy(accelerator.unwrap_model(model))))
        return loss

    model.train()
    if val_targets and start_step == 0:  # where the unhealed slice starts
        log.validation.append((0, validate()))
    best = EarlyStopping(params, cfg.patience, [])
    if state is not None:
        best.load(state["best"])
    elif val_targets:
        best.update(0, log.validation[0][1])  # the unhealed slice is a candidate too
    started = time.perf_counter()
    log.stopped_by = "steps"
    bar = tqdm(
        range(start_step, cfg.steps),
        desc="heal",
        unit="step",
        disable=not (progress and main),
        initial=start_step,
        total=cfg.steps,
    )
    for step in bar:
        batches: list[TeacherTargets] = []
        for _ in range(world):  # one batch per process; this process trains on its own
            if not epoch:
                epoch = torch.randperm(len(train_targets), generator=order).tolist()
            batches.append(train_targets[epoch.pop()])
        target = _to(batches[rank], accelerator.device)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        logits = model(
            input_ids=target.input_ids, attention_mask=target.attention_mask, use_cache=False
        ).logits
        loss = heal_loss(logits, target, cfg.temperature, cfg.label_weight)
        del logits  # the graph keeps what backward needs; the next forward need not wait
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        value = mean_over_processes(accelerator, float(loss.detach()), 1)
        if not math.isfinite(value):
            raise HealError(f"healing diverged at step {step} (loss {value}); lower heal.lr")
        log.train_loss.append(value)
        log.tokens += sum(b.n_tokens for b in batches)
        bar.set_postfix(loss=f"{value:.4f}")
        if on_step is not None:
            on_step(step, value)
        done = step + 1
        if val_targets and (done % cfg.eval_every == 0 or done == cfg.steps):
            log.validation.append((done, validate()))
            logger.info(
                "heal: step %d/%d, %d tokens, train loss %.4f, validation %.4f (%.0f s)",
                done,
                cfg.steps,
                log.tokens,
                value,
                log.validation[-1][1],
                time.perf_counter() - started,
            )
            if best.update(done, log.validation[-1][1]):
                log.stopped_by = "patience"
                break
        due = done % cfg.checkpoint_every == 0 and done < cfg.steps
        if main and state_file is not None and due:
            resume = {
                "order": order.get_state(),
                "epoch": epoch,
                "rng": torch.get_rng_state(),
                "best": best.state(),
            }
            save_state(state_file, params, optimizer, done, log, settings_key, resume)
        out_of_tokens = cfg.max_tokens is not None and log.tokens >= cfg.max_tokens
        late = cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes
        out_of_time = cfg.max_minutes is not None and any_process(accelerator, late)
        if out_of_tokens or out_of_time:
            log.stopped_by = "tokens" if out_of_tokens else "time"
            if val_targets and log.validation[-1][0] != done:
                # the last weights are a candidate too: without this, a budget that ends
                # before the first evaluation would put the unhealed weights back
                log.validation.append((done, validate()))
                best.update(done, log.validation[-1][1])
            break
    bar.close()
    log.best_step = best.restore()
    log.steps = len(log.train_loss)
    log.seconds = round(time.perf_counter() - started, 2)
    if main and state_file is not None and state_file.exists():
        state_file.unlink()
    logger.info(
        "heal: %d steps in %.0f s on %d process(es) (stopped by %s), loss %.4f -> %.4f",
        log.steps,
        log.seconds,
        world,
        log.stopped_by,
        log.train_loss[0] if log.train_loss else math.nan,
        log.train_loss[-1] if log.train_loss else math.nan,
    )
    return _finish(_unwrap(model, cfg, accelerator, reload)), log


def _to(target: TeacherTargets, device: torch.device) -> TeacherTargets:
    """``target`` on ``device`` (itself when it is there already)."""
    if target.input_ids.device == device:
        return target
    moved = [None if t is None else t.to(device) for t in _tensors(target)]
    return TeacherTargets(*moved)  # type: ignore[arg-type]


def _tensors(target: TeacherTargets) -> list[torch.Tensor | None]:
    return [
        target.input_ids,
        target.attention_mask,
        target.top_ids,
        target.top_logprobs,
        target.weights,
        target.labels,
    ]


@torch.no_grad()
def _validation_loss(
    model: nn.Module, targets: list[TeacherTargets], cfg: HealConfig, accelerator: Accelerator
) -> float:
    """The mean loss over ``targets``; each process takes every N-th batch from its rank
    (and as many forward passes as the others: FSDP gathers weights in every one)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    passes = -(-len(targets) // world)
    model.eval()
    losses = []
    for i in range(rank, passes * world, world):
        target = _to(targets[i % len(targets)], accelerator.device)
        logits = model(
            input_ids=target.input_ids, attention_mask=target.attention_mask, use_cache=False
        ).logits
        if i < len(targets):  # the extra pass of an uneven split counts nothing
            losses.append(float(heal_loss(logits, target, cfg.temperature, cfg.label_weight)))
    model.train()
    return mean_over_processes(accelerator, sum(losses), len(losses))


def _unwrap(
    model: nn.Module,
    cfg: HealConfig,
    accelerator: Accelerator,
    reload: Callable[[], PreTrainedModel] | None,
) -> PreTrainedModel | PeftModel:
    """The trained model as one plain module: unwrapped, or under FSDP its full state
    gathered (every process takes part) into ``reload()`` on the main process."""
    if not is_fsdp(accelerator):
        unwrapped: PreTrainedModel | PeftModel = accelerator.unwrap_model(model)
        return unwrapped
    full = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        sharded: PreTrainedModel | PeftModel = accelerator.unwrap_model(model)
        return sharded
    if reload is None:
        raise HealError("heal_model under FSDP needs reload: the student, fresh from disk")
    torch.manual_seed(cfg.seed)
    fresh, _ = _prepare(reload(), cfg)
    fresh.load_state_dict(full)
    return fresh
