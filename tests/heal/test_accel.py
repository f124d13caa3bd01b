"""Healing through accelerate: one process gives what the plain torch loop gave."""

from __future__ import annotations

import copy
import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NEWS_TASK, REPO, tiny_model, tiny_recipe, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import SMALL, TEXTS, half_plan
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import fbnprune.heal.stage
from fbnprune.heal.distill import (
    HealError,
    distillation_loss,
    load_targets,
    prepare_targets,
    validation_loss,
)
from fbnprune.heal.launch import checked_student, load_student
from fbnprune.heal.train import _finish, _lr_at, _prepare, heal_model
from fbnprune.pipeline import run_pipeline
from fbnprune.pruning.slicing import slice_model
from fbnprune.recipe import HealConfig, parse_recipe
from fbnprune.rundir import RunDir
from fbnprune.rundir.context import RunContext

ROOT = REPO


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


def heal_recipe(model_dir, **heal):
    """The tiny recipe, magnitude-selected, healed for 8 steps."""
    return parse_recipe(
        tiny_recipe(
            model_dir,
            name="tiny-heal",
            tasks=[{**NEWS_TASK, "calibration_samples": 8, "heldout_samples": 6}],
            select={"selector": "magnitude"},
            heal={
                "enabled": None,
                "steps": 8,
                "batch_size": 2,
                "max_length": 32,
                "eval_every": 4,
                "lr": 3e-3,
                **heal,
            },
        )
    )


def live_models(width: int) -> int:
    """How many Llama models of MLP width ``width`` are alive in this process."""
    gc.collect()
    return sum(
        1
        for obj in gc.get_objects()
        if issubclass(type(obj), LlamaForCausalLM)
        and obj.model.layers[0].mlp.down_proj.in_features == width
    )


def test_student_from_the_checkpoint_heals_like_the_slice_without_the_teacher(
    tmp_path, tiny_llama_dir, monkeypatch
):
    recipe = heal_recipe(tiny_llama_dir)
    assert "student" not in recipe.heal.model_dump()  # old recipes keep their keys
    run = tmp_path / "run"
    run_pipeline(recipe, run, progress=False)
    healed = run / "checkpoint-compact-healed" / "model.safetensors"
    in_memory = load_file(healed)
    (run / "heal" / "teacher.safetensors").unlink()  # the teacher must run again
    from_disk = recipe.model_copy(
        update={"heal": recipe.heal.model_copy(update={"student": "checkpoint"})}
    )
    assert from_disk.heal.model_dump()["student"] == "checkpoint"
    alive: list[int] = []
    real = fbnprune.heal.stage.load_student

    def spy(*args, **kwargs):
        alive.append(live_models(48))  # the teacher's MLP width
        return real(*args, **kwargs)

    monkeypatch.setattr(fbnprune.heal.stage, "load_student", spy)
    summary = run_pipeline(from_disk, run, progress=False)
    assert summary.executed == ["heal"] and alive == [0]
    assert summary.stages["heal"].details["processes"] == 1
    got = load_file(healed)
    assert got.keys() == in_memory.keys()
    assert all(torch.equal(got[k], in_memory[k]) for k in got)  # the same student, trained


def test_a_changed_checkpoint_is_no_student(tmp_path, tiny_llama_dir):
    recipe = heal_recipe(tiny_llama_dir, student="checkpoint")
    run = tmp_path / "run"
    run_pipeline(recipe, run, progress=False, until="save")
    ctx = RunContext(recipe, RunDir(run), progress=False)
    assert checked_student(ctx, "compact") == run / "checkpoint-compact"
    (run / "checkpoint-compact" / "config.json").write_text("{}")
    with pytest.raises(HealError, match="differs from the checked one"):
        checked_student(ctx, "compact")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_processes_heal_through_accelerate_launch(tmp_path, tiny_llama_dir):
    """A real ``accelerate launch`` of two CPU processes (gloo on loopback): the main one
    runs every stage, the other joins its heal; the healed checkpoint is checked and saved
    once."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(heal_recipe(tiny_llama_dir, steps=10).to_yaml())
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate),
        "launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate" / "cpu-2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "fbnprune",
        "heal",
        str(recipe_file),
        "--out",
        str(run),
        "--no-progress",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads((run / "heal" / "log.json").read_text())
    assert log["processes"] == 2 and log["steps"] == 10
    assert sum(log["train_loss"][-3:]) < sum(log["train_loss"][:3])
    # the validation loss, its batches split over the processes, is the one-process mean
    file = run / "heal" / "teacher.safetensors"
    with safe_open(str(file), framework="pt") as f:
        key = f.metadata()["key"]
    _, validation = load_targets(file, key)
    student = load_student(run / "checkpoint-compact", "compact", torch.float32)
    assert len(validation) == 3 and log["validation"][0][0] == 0
    assert log["validation"][0][1] == pytest.approx(validation_loss(student, validation, 1.0))
    heal = json.loads((run / "run.json").read_text())["stages"]["heal"]
    assert heal["details"]["processes"] == 2 and heal["details"]["reload_max_abs"] == 0.0
    healed = AutoModelForCausalLM.from_pretrained(
        run / "checkpoint-compact-healed", trust_remote_code=True
    )
    unhealed = AutoModelForCausalLM.from_pretrained(
        run / "checkpoint-compact", trust_remote_code=True
    )
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert not torch.allclose(healed(ids).logits, unhealed(ids).logits)
    assert done.stdout.count("run directory:") == 1  # one summary: the main process's


def test_shipped_accelerate_configs_load_with_accelerates_loader():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    fsdp = load_config_from_file(str(ROOT / "recipes" / "accelerate" / "fsdp2.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.mixed_precision == "bf16"
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_reshard_after_forward"] is True  # full sharding
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    cpu = load_config_from_file(str(ROOT / "recipes" / "accelerate" / "cpu-2proc.yaml"))
    assert cpu.num_processes == 2 and cpu.use_cpu


def test_fsdp2_wraps_the_decoder_layers_the_config_names():
    """The wrap policy of fsdp2.yaml, as accelerate builds it: every decoder layer of a
    sliced model (stock or compact classes) is its own FSDP unit."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT"
    )
    teacher = tiny_model("llama")
    student = slice_model(copy.deepcopy(teacher), half_plan(teacher), layout="compact")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, student)
    wrapped = [type(m).__name__ for m in student.modules() if policy(m)]
    assert wrapped == ["LlamaDecoderLayer"] * 3
