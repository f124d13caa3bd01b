"""Healing: the distillation loss, training that lowers it, LoRA merge, resume, the stage."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import NEWS_TASK, VOCAB, tiny_model, tiny_recipe, tiny_tokenizer
from PIL import Image
from transformers import AutoModelForCausalLM

from fbnprune.cli.run import format_summary, heal_line
from fbnprune.heal.distill import (
    HealError,
    TeacherTargets,
    distillation_loss,
    load_targets,
    save_targets,
    teacher_targets,
)
from fbnprune.heal.train import heal_model, trainable_linears
from fbnprune.pipeline import run_pipeline
from fbnprune.plan import PrunePlan
from fbnprune.pruning.slicing import slice_model
from fbnprune.publish.folder import ExportError, export_run
from fbnprune.recipe import HealConfig, parse_recipe

GOODS = ["stock", "bond", "oil", "gold", "grain", "coffee", "copper", "wheat"]
TEXTS = [f"the {w} market rose by {i} points on monday" for i, w in enumerate(GOODS)]
SMALL = dict(
    steps=30,
    batch_size=4,
    max_length=48,
    lr=3e-3,
    top_k=VOCAB,
    max_minutes=None,
    eval_every=10,
    checkpoint_every=10,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def half_plan(model: torch.nn.Module, model_type: str = "llama") -> PrunePlan:
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    kept = [list(range(0, w, 2)) for w in widths]
    kept[-1] = kept[-1][:3]  # uneven widths, so the padded layout has padding units
    return PrunePlan(
        model="tiny",
        model_type=model_type,
        site="hidden",
        fill="zero",
        layer_widths=widths,
        kept=kept,
    )


def targets_of(teacher, texts=TEXTS, top_k=VOCAB) -> list[TeacherTargets]:
    from fbnprune.collect.activations import token_batches

    return teacher_targets(teacher, token_batches(tiny_tokenizer(), texts, 48, 4), top_k=top_k)


def test_loss_is_zero_for_the_teacher_and_equals_full_kl_with_every_token_kept():
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    for target in targets_of(teacher):
        with torch.no_grad():
            same = distillation_loss(
                teacher(input_ids=target.input_ids, attention_mask=target.attention_mask).logits,
                target,
            )
            logits = student(
                input_ids=target.input_ids, attention_mask=target.attention_mask
            ).logits
            ours = distillation_loss(logits, target)
            t_logits = teacher(
                input_ids=target.input_ids, attention_mask=target.attention_mask
            ).logits
        keep = target.attention_mask.bool()  # every real position, the last one included
        reference = F.kl_div(
            F.log_softmax(logits[keep], -1),
            F.log_softmax(t_logits[keep], -1),
            log_target=True,
            reduction="batchmean",
        )
        assert abs(float(same)) < 1e-5
        assert float(ours) == pytest.approx(float(reference), rel=1e-4)
        assert float(ours) > 0.01


def test_top_k_loss_is_a_kl_on_coarsened_distributions():
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    target = targets_of(teacher, top_k=8)[0]
    assert target.top_ids.shape[-1] == 8
    with torch.no_grad():
        loss = distillation_loss(
            student(input_ids=target.input_ids, attention_mask=target.attention_mask).logits, target
        )
    full = targets_of(teacher, top_k=VOCAB)[0]
    with torch.no_grad():
        exact = distillation_loss(
            student(input_ids=full.input_ids, attention_mask=full.attention_mask).logits, full
        )
    assert 0 < float(loss) <= float(exact) + 1e-6  # coarsening never increases a KL


@pytest.mark.parametrize("layout", ["padded", "compact"])
def test_full_healing_lowers_the_loss_and_keeps_padding_dead(layout):
    teacher = tiny_model("llama")
    sliced = slice_model(copy.deepcopy(teacher), half_plan(teacher), layout=layout)
    shapes = {n: p.shape for n, p in sliced.named_parameters()}
    healed, log = heal_model(
        sliced,
        teacher,
        tiny_tokenizer(),
        TEXTS,
        HealConfig(**SMALL),
        validation=TEXTS[:2],
        progress=False,
    )
    assert {n: p.shape for n, p in healed.named_parameters()} == shapes
    assert log.steps == 30 and log.stopped_by == "steps"
    assert sum(log.train_loss[-5:]) < 0.7 * sum(log.train_loss[:5])
    assert log.validation[-1][1] < log.validation[0][1] and log.validation[-1][0] == 30
    assert not any(p.requires_grad for p in healed.parameters()) and not healed.training
    # embeddings and attention are frozen under modules="mlp"
    assert torch.equal(healed.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(
        healed.model.layers[0].self_attn.q_proj.weight,
        teacher.model.layers[0].self_attn.q_proj.weight,
    )
    if layout == "padded":  # the last layer keeps 3 units; the rest is zero padding
        mlp = healed.model.layers[-1].mlp
        assert torch.count_nonzero(mlp.gate_proj.weight[3:]) == 0
        assert torch.count_nonzero(mlp.down_proj.weight[:, 3:]) == 0


def test_lora_is_merged_into_plain_weights():
    teacher = tiny_model("llama")
    sliced = slice_model(copy.deepcopy(teacher), half_plan(teacher), layout="compact")
    before = {n: p.detach().clone() for n, p in sliced.named_parameters()}
    cfg = HealConfig(**{**SMALL, "method": "lora", "lora_rank": 4, "steps": 10})
    healed, log = heal_model(sliced, teacher, tiny_tokenizer(), TEXTS, cfg, progress=False)
    after = dict(healed.named_parameters())
    assert set(after) == set(before)  # no lora_A/lora_B left, same names
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(".mlp." in n for n in changed)
    assert log.trainable_parameters < sum(p.numel() for p in before.values()) / 4


def test_trainable_modules():
    model = tiny_model("llama")
    mlp = trainable_linears(model, "mlp")
    every = trainable_linears(model, "all")
    assert len(mlp) == 3 * 3 and len(every) == 3 * 7
    assert len(trainable_linears(tiny_model("gpt2"), "mlp")) == 3 * 2  # Conv1D


def test_resume_after_interruption_and_time_budget(tmp_path):
    teacher = tiny_model("llama")
    plan = half_plan(teacher)
    state = tmp_path / "state.pt"
    cfg = HealConfig(**{**SMALL, "steps": 20, "checkpoint_every": 5})

    def stop(step: int, loss: float) -> None:
        if step == 12:
            raise KeyboardInterrupt

    student = slice_model(copy.deepcopy(teacher), plan, layout="compact")
    with pytest.raises(KeyboardInterrupt):
        heal_model(
            student,
            teacher,
            tiny_tokenizer(),
            TEXTS,
            cfg,
            state_file=state,
            progress=False,
            on_step=stop,
        )
    assert state.is_file()
    student = slice_model(copy.deepcopy(teacher), plan, layout="compact")
    _, log = heal_model(
        student, teacher, tiny_tokenizer(), TEXTS, cfg, state_file=state, progress=False
    )
    assert log.resumed_from == 10 and log.steps == 20 and not state.exists()

    timed = HealConfig(**{**SMALL, "max_minutes": 1e-9})
    student = slice_model(copy.deepcopy(teacher), plan, layout="compact")
    _, log = heal_model(student, teacher, tiny_tokenizer(), TEXTS, timed, progress=False)
    assert log.stopped_by == "time" and log.steps == 1


@pytest.mark.parametrize("patience", [None, 100])
def test_a_resumed_heal_is_the_uninterrupted_heal_bit_for_bit(tmp_path, patience):
    """Killed after the state of step 10, then resumed: the same batches in the same order,
    the same losses, the same weights; with early stopping, the best weights of step 0 (the
    validation loss only rises at this learning rate) are the ones restored."""
    teacher = tiny_model("llama")
    plan = half_plan(teacher)
    cfg = HealConfig(
        **{**SMALL, "steps": 20, "checkpoint_every": 5, "eval_every": 4, "lr": 3e-2},
        patience=patience,
    )

    def heal(state=None, on_step=None):
        student = slice_model(copy.deepcopy(teacher), plan, layout="compact")
        return heal_model(
            student,
            teacher,
            tiny_tokenizer(),
            TEXTS[:6],
            cfg,
            validation=TEXTS[6:],
            state_file=state,
            progress=False,
            on_step=on_step,
        )

    whole, whole_log = heal()

    def kill(step: int, loss: float) -> None:
        if step == 12:
            raise KeyboardInterrupt

    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        heal(state, kill)
    resumed, log = heal(state)
    assert log.resumed_from == 10 and log.train_loss == whole_log.train_loss
    assert log.validation == whole_log.validation and log.best_step == whole_log.best_step
    if patience is not None:
        assert whole_log.best_step == 0  # before the kill
    for (name, want), got in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(want, got), name


def test_teacher_targets_round_trip_through_safetensors(tmp_path):
    teacher = tiny_model("llama")
    train = targets_of(teacher, top_k=8)
    train[0].weights = torch.rand(train[0].top_ids.shape[0])
    file = tmp_path / "heal" / "teacher.safetensors"
    save_targets(file, "key-1", (train, train[:1]))
    assert [p.name for p in file.parent.iterdir()] == ["teacher.safetensors"]  # no temp left
    loaded = load_targets(file, "key-1")
    assert loaded is not None and len(loaded[0]) == len(train) and len(loaded[1]) == 1
    for got, want in zip(loaded[0], train, strict=True):
        for name in ("input_ids", "attention_mask", "top_ids", "top_logprobs"):
            assert torch.equal(getattr(got, name), getattr(want, name))
    assert torch.equal(loaded[0][0].weights, train[0].weights) and loaded[0][1].weights is None
    assert load_targets(file, "key-2") is None  # computed from other inputs
    assert load_targets(tmp_path / "absent.safetensors", "key-1") is None


def test_no_text_is_an_error():
    teacher = tiny_model("llama")
    with pytest.raises(HealError, match="no text"):
        heal_model(copy.deepcopy(teacher), teacher, tiny_tokenizer(), [], HealConfig())


def test_heal_stage_saves_a_checked_loadable_checkpoint(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    recipe = parse_recipe(
        tiny_recipe(
            model_dir,
            name="tiny-heal",
            tasks=[{**NEWS_TASK, "calibration_samples": 8}],
            select={"selector": "magnitude"},
            heal={"enabled": None, "steps": 6, "batch_size": 4, "max_length": 32, "eval_every": 3},
        )
    )
    assert recipe.heal.active(recipe.select.budget)
    summary = run_pipeline(recipe, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    healed_dir = run / "checkpoint-compact-healed"
    assert summary.checkpoints["compact-healed"] == healed_dir
    log = json.loads((run / "heal" / "log.json").read_text())
    assert log["steps"] == 6 and len(log["train_loss"]) == 6 and log["validation"]
    assert Image.open(run / "heal" / "loss.png").size[0] > 300
    assert (healed_dir / "fbnprune_heal.json").is_file()
    assert summary.stages["heal"].details["reload_max_abs"] == 0.0
    assert "heal: 6 steps, ran its heal.steps; loss" in format_summary(summary)
    timed = {**summary.stages["heal"].details, "stopped_by": "time", "steps": 4}
    assert "heal: 4 steps, stopped by heal.max_minutes" in heal_line(timed)
    healed = AutoModelForCausalLM.from_pretrained(healed_dir, trust_remote_code=True)
    unhealed = AutoModelForCausalLM.from_pretrained(
        run / "checkpoint-compact", trust_remote_code=True
    )
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert not torch.allclose(healed(ids).logits, unhealed(ids).logits)
    # the same export code publishes it, with a card that says it was healed
    exported = export_run(run, healed=True)
    assert exported.out_dir == run / "export-compact-healed" and exported.layout == "compact"
    card = (exported.out_dir / "README.md").read_text()
    assert "## Healing" in card and "-healed" in card
    assert "calibration and healing documents only" in card
    assert "with no retraining" not in card
    reloaded = AutoModelForCausalLM.from_pretrained(exported.out_dir, trust_remote_code=True)
    assert torch.equal(reloaded(ids).logits, healed(ids).logits)
    unhealed_card = (export_run(run, layout="compact").out_dir / "README.md").read_text()
    assert "## Healing" not in unhealed_card
    with pytest.raises(ExportError, match="no checkpoint-padded-healed"):
        export_run(run, layout="padded", healed=True)
    # a second run reuses it; a budget above below_budget skips healing
    again = run_pipeline(recipe, run, progress=False)
    assert again.stages["heal"].finished == summary.stages["heal"].finished
    # activation checkpointing changes the memory, not the weights: the heal is reused
    recompute = recipe.heal.model_copy(update={"activation_checkpointing": True})
    rerun = run_pipeline(recipe.model_copy(update={"heal": recompute}), run, progress=False)
    assert "heal" not in rerun.executed
    # other training settings heal again, from the teacher's targets kept on disk
    assert (run / "heal" / "teacher.safetensors").is_file()

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr("fbnprune.heal.distill.prepare_targets", no_teacher)
    retuned = recipe.model_copy(update={"heal": recipe.heal.model_copy(update={"lr": 1e-3})})
    assert run_pipeline(retuned, run, progress=False).stages["heal"].details["steps"] == 6
    longer = recipe.model_copy(update={"heal": recipe.heal.model_copy(update={"max_length": 24})})
    with pytest.raises(AssertionError, match="the teacher ran again"):
        run_pipeline(longer, run, progress=False)  # other targets: the teacher must run
    bigger = recipe.model_copy(update={"select": recipe.select.model_copy(update={"budget": 0.6})})
    assert not bigger.heal.active(bigger.select.budget)
    # in the same directory the stale healed checkpoint (of the 25% plan) is removed
    assert "compact-healed" not in run_pipeline(bigger, run, progress=False).checkpoints
    assert (
        not healed_dir.exists()
        and "heal" not in json.loads((run / "run.json").read_text())["stages"]
    )
    run_pipeline(retuned, run, progress=False)  # healed again, at lr 1e-3
    assert healed_dir.is_dir()
    # healing again under other settings, interrupted: no checkpoint of the old settings is
    # left for export to pass off as the recipe's
    changed = retuned.model_copy(update={"heal": recipe.heal.model_copy(update={"lr": 1e-4})})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fbnprune.heal.train.heal_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(changed, run, progress=False)
    assert not healed_dir.exists()
    with pytest.raises(ExportError, match="no checkpoint-<layout>-healed"):
        export_run(run, healed=True)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_activation_checkpointing_heals_the_same_weights_bit_for_bit(method, family):
    teacher = tiny_model(family)
    cfg = {**SMALL, "steps": 8, "method": method, "lora_rank": 4, "modules": "all"}
    healed = {}
    for recompute in (False, True):
        sliced = slice_model(copy.deepcopy(teacher), half_plan(teacher, family), layout="compact")
        healed[recompute], _ = heal_model(
            sliced,
            teacher,
            tiny_tokenizer(),
            TEXTS,
            HealConfig(**cfg, activation_checkpointing=recompute),
            validation=TEXTS[:2],
            progress=False,
        )
    assert healed[True].is_activation_checkpointing is False  # the healed model is plain
    plain, recomputed = healed[False].state_dict(), healed[True].state_dict()
    assert plain.keys() == recomputed.keys()
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)
    assert not all(torch.equal(plain[k], teacher.state_dict().get(k, plain[k])) for k in plain)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_teacher_targets_in_chunks_of_positions_are_the_whole_tensors(temperature, monkeypatch):
    import fbnprune.heal.distill as distill
    from fbnprune.collect.activations import token_batches

    teacher = tiny_model("llama")
    batches = token_batches(tiny_tokenizer(), TEXTS, 48, 4)
    whole = teacher_targets(teacher, batches, top_k=7, temperature=temperature)
    logits = teacher(input_ids=batches[0][0], attention_mask=batches[0][1]).logits
    rows = logits[batches[0][1].bool()]
    want = F.log_softmax(rows / temperature, dim=-1).topk(7, dim=-1)
    assert torch.equal(whole[0].top_logprobs, want.values)
    assert torch.equal(whole[0].top_ids, want.indices)
    monkeypatch.setattr(distill, "TARGET_CHUNK", 3)  # every batch in several chunks
    chunked = teacher_targets(teacher, batches, top_k=7, temperature=temperature)
    assert rows.shape[0] > 3
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a.top_logprobs, b.top_logprobs) and torch.equal(a.top_ids, b.top_ids)
    empty = distill._top_logprobs(torch.zeros(0, 11), 7, temperature)
    assert empty[0].shape == (0, 7) and empty[1].shape == (0, 7)
