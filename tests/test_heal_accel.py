"""Healing through accelerate: one process gives what the plain torch loop gave."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from test_heal import SMALL, TEXTS, half_plan

from fbnprune.distill import distillation_loss, prepare_targets
from fbnprune.heal import _finish, _lr_at, _prepare, heal_model
from fbnprune.recipe import HealConfig
from fbnprune.slicing import slice_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plain_torch_heal(student, targets, cfg: HealConfig):
    """The loop ``heal_model`` ran before accelerate (one device, no validation, no state):
    the reference the accelerate loop must reproduce in one process."""
    torch.manual_seed(cfg.seed)
    model, params = _prepare(student, cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)
    model.train()
    epoch: list[int] = []
    losses = []
    for step in range(cfg.steps):
        if not epoch:
            epoch = torch.randperm(len(targets), generator=order).tolist()
        target = targets[epoch.pop()]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        logits = model(input_ids=target.input_ids, attention_mask=target.attention_mask).logits
        loss = distillation_loss(logits, target, cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    return _finish(model), losses


@pytest.mark.parametrize("method", ["full", "lora"])
def test_one_process_heal_equals_the_plain_torch_loop(method):
    teacher = tiny_model("llama")
    plan = half_plan(teacher)
    # lr high enough that clipping is active on some steps (max_grad_norm 0.05)
    cfg = HealConfig(
        **{**SMALL, "steps": 12, "method": method, "lora_rank": 4, "max_grad_norm": 0.05}
    )
    targets = prepare_targets(teacher, tiny_tokenizer(), TEXTS, cfg, validation=TEXTS[:3])
    unhealed = slice_model(copy.deepcopy(teacher), plan, layout="compact")
    before = {n: p.detach().clone() for n, p in unhealed.named_parameters()}
    want, want_losses = plain_torch_heal(unhealed, targets[0], cfg)
    got, log = heal_model(
        slice_model(copy.deepcopy(teacher), plan, layout="compact"),
        teacher,
        tiny_tokenizer(),
        TEXTS,
        cfg,
        targets=targets,
        progress=False,
    )
    assert log.train_loss == want_losses  # exactly: same batches, same arithmetic
    want_params = dict(want.named_parameters())
    for name, param in got.named_parameters():
        assert torch.equal(param, want_params[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in got.named_parameters())
    assert log.processes == 1 and want_losses[-1] < want_losses[0]
