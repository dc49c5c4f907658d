"""The shared training core (issue 8): pruning under a kill, the lr-schedule message on a longer resume,
evaluation slices, the bad-step streak, the optimizer step over micro-batches, the logging window, model
facts read from the real model (init_from included), the task-generic export with its parity check, and
the launch plan."""

from __future__ import annotations

import json
import math
import re
import socket

import pytest
import torch

from lmforge import atomic
from lmforge import checkpoint as ckpt
from lmforge.config.loader import load_config
from lmforge.config.model import ModelConfig
from lmforge.config.pretrain import BatchConfig, EngineConfig, OptimConfig
from lmforge.loop import Health, Stepper, Window, eval_slices
from lmforge.models import ModelError, build, describe, flops_per_token, model_config, num_params
from lmforge.schedule import lr_at, schedule_change

from ..conftest import ROOT

# --------------------------------------------------------------------------------------------------
# checkpoint.prune: a kill mid-delete never leaves a folder that looks complete


class Killed(BaseException):
    """What a SIGKILL mid-rmtree looks like to the caller: nothing after it runs (not an OSError that
    `ignore_errors` would swallow)."""


def committed(root, step):
    folder = root / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (folder / name).write_bytes(b"shard")
    ckpt.commit(folder, {"step": step})
    return folder


def test_a_kill_mid_prune_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    for step in (1, 2, 3):
        committed(root, step)
    deleted = []

    def killed_mid_delete(path, ignore_errors=False, **kwargs):
        # a shard goes, the commit record stays
        shard = next(p for p in sorted(path.iterdir()) if p.name != ckpt.RECORD)
        shard.unlink()
        deleted.append(shard)
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(ckpt.shutil, "rmtree", killed_mid_delete)
        with pytest.raises(Killed):
            ckpt.prune(root, keep_last=1)
    assert len(deleted) == 1  # the kill came inside the first delete
    # the half-deleted step 1 is out of the complete set: a resume can never choose it
    assert [c.step for c in ckpt.complete(root)] == [2, 3]
    assert not (root / ckpt.tag_for(1)).exists() and ckpt.incomplete(root) == []
    leftovers = [p for p in root.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(atomic.TMP_SUFFIX)
    # the next start-up's cleanup (rank 0, on the run folder) removes it
    assert atomic.remove_leftovers(run_dir) == 1
    assert sorted(p.name for p in root.iterdir()) == [ckpt.tag_for(2), ckpt.tag_for(3)]
    # and a later prune, uninterrupted, goes on from there
    assert [p.name for p in ckpt.prune(root, keep_last=1)] == [ckpt.tag_for(2)]
    assert [c.step for c in ckpt.complete(root)] == [3] and list(root.glob(".*")) == []


# --------------------------------------------------------------------------------------------------
# schedule.schedule_change: a longer (or shorter) run on resume says what it does to the lr


def lrs_in(message: str) -> tuple[float, float]:
    before, after = re.search(r"lr goes from (\S+) \(the old schedule\) to (\S+) ", message).groups()
    return float(before), float(after)


def test_schedule_change_is_silent_when_max_steps_is_unchanged_or_unknown():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert schedule_change(None, 200, 50, optim) is None  # a checkpoint that did not record it
    assert schedule_change(100, 100, 50, optim) is None


def test_cosine_reshapes_and_the_message_shows_the_lr_jump():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
    message = schedule_change(100, 200, 50, optim)
    assert "from 100 to 200 at step 50" in message and "cosine" in message
    before, after = lrs_in(message)
    assert before == pytest.approx(lr_at(50, 100, 1e-3, 1e-4, 10, "cosine"), rel=1e-3)
    assert after == pytest.approx(lr_at(50, 200, 1e-3, 1e-4, 10, "cosine"), rel=1e-3)
    assert after > before * 1.4  # 6.1e-4 -> 9.0e-4: 44% into the old decay, 21% into the new one


def test_wsd_extends_cleanly_before_its_decay_and_not_inside_it():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    before, after = lrs_in(schedule_change(100, 200, 50, optim))  # the old decay would start at step 80
    assert before == after == pytest.approx(1e-3)
    before, after = lrs_in(schedule_change(100, 200, 90, optim))  # inside the old decay: the lr goes back up
    assert before < after == pytest.approx(1e-3)


# --------------------------------------------------------------------------------------------------
# loop.eval_slices: equal forwards on every rank, every item once


@pytest.mark.parametrize("count, micro, world", [(10, 2, 2), (10, 3, 4), (7, 4, 3), (1, 1, 4), (3, 2, 8),
                                                 (64, 8, 2), (5, 5, 1), (0, 2, 2)])
def test_eval_slices_give_every_rank_the_same_forwards_and_every_item_once(count, micro, world):
    per_rank = [list(eval_slices(count, micro, rank, world)) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # under ZeRO-3 a forward is a collective
    assert len(per_rank[0]) == math.ceil(math.ceil(count / world) / micro)  # and no more than needed
    real = []
    for batches in per_rank:
        for ids, is_real in batches:
            assert 1 <= len(ids) <= micro
            if is_real:
                real += ids
            else:
                assert all(0 <= i < max(count, 1) for i in ids)  # a valid item to run, discarded after
    assert sorted(real) == list(range(count))  # exactly once each
    if 0 < count < world:
        assert [is_real for ids, is_real in per_rank[-1]] == [False]  # a rank with no item still runs one


# --------------------------------------------------------------------------------------------------
# loop.Health: the bad-step streak


def test_health_counts_the_streak_and_the_skipped_total():
    health = Health(max_bad=3, skipped=4)  # a resumed run carries its skipped total
    assert health.update(1.5) is False and health.streak == 0
    assert health.update(float("nan")) is True and health.update(float("inf")) is True
    assert (health.streak, health.skipped, health.exhausted) == (2, 6, False)
    assert health.update(None) is False  # ZeRO-0 without a norm: a finite step
    assert (health.streak, health.skipped) == (0, 6)  # a finite step resets the streak, not the total
    for _ in range(2):
        health.update(float("nan"))
    assert not health.exhausted
    assert health.update(float("-inf")) is True and health.exhausted and health.skipped == 9
    assert "3 consecutive steps" in health.abort_message() and "train.max_bad_steps" in health.abort_message()
    health.update(0.25)
    assert not health.exhausted


# --------------------------------------------------------------------------------------------------
# loop.Stepper: one optimizer step over the micro-batches


class FakeOptimizer:
    def __init__(self):
        self.steps = 0

    def step(self, *args, **kwargs):
        self.steps += 1


class FakeEngine:
    """What Stepper and lmforge.engine (zero_stage, params_grad_norm, update_skipped, grad_norm) use of a
    DeepSpeed engine: `backward` scales by 1/accum, `step` calls the optimizer's step only at the
    accumulation boundary and then zeroes the gradients, ZeRO 1-3 report the global norm."""

    def __init__(self, stage: int, accum: int, global_norm: float | None = None):
        self.config = {"zero_optimization": {"stage": stage}}
        torch.manual_seed(0)
        self.module = torch.nn.Linear(4, 3)
        self.optimizer = FakeOptimizer()
        self.accum, self.micro_steps, self.global_norm = accum, 0, global_norm

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.accum == 0:
            self.optimizer.step()  # looked up now: update_skipped swaps it for a no-op
            self.module.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return self.global_norm


def micro_losses(engine, n):
    xs = torch.randn(n, 2, 4, generator=torch.Generator().manual_seed(1))
    return [engine.module(x).pow(2).mean() for x in xs]


def test_stepper_keeps_the_mean_loss_on_the_device_and_steps_once_per_accumulation(monkeypatch):
    engine = FakeEngine(stage=2, accum=4, global_norm=7.25)
    stepper = Stepper(engine, accum=4)
    losses = micro_losses(engine, 4)
    with monkeypatch.context() as m:  # no host sync while the micro-batches run
        for name in ("item", "tolist", "__float__"):
            m.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host sync per micro-batch"))
        for loss in losses[:-1]:
            stepper.backward(loss)
    assert engine.optimizer.steps == 0
    stepper.backward(losses[-1])
    assert engine.optimizer.steps == 1
    loss, norm = stepper.result()
    assert isinstance(loss, torch.Tensor) and not loss.requires_grad
    assert float(loss) == pytest.approx(sum(float(x.detach()) for x in losses) / 4)
    assert norm == 7.25  # ZeRO 1-3: the engine's global norm, not one from the local gradients
    with pytest.raises(RuntimeError, match="0 backward calls for a step of 4"):
        stepper.result()  # result() resets: a second call is a step without backwards


def test_stepper_result_before_the_last_micro_batch_raises():
    engine = FakeEngine(stage=0, accum=3)
    stepper = Stepper(engine, accum=3)
    with pytest.raises(RuntimeError, match="0 backward calls for a step of 3 micro-batches"):
        stepper.result()
    for loss in micro_losses(engine, 2):
        stepper.backward(loss)
    with pytest.raises(RuntimeError, match="2 backward calls for a step of 3 micro-batches"):
        stepper.result()


def test_stepper_at_zero0_skips_a_non_finite_update_and_reports_the_norm():
    engine = FakeEngine(stage=0, accum=2)
    stepper = Stepper(engine, accum=2)
    first, second = micro_losses(engine, 2)
    # the norm is read from the gradients at the boundary, before the engine's step zeroes them
    grads = torch.autograd.grad((first + second) / 2, list(engine.module.parameters()), retain_graph=True)
    stepper.backward(first)
    stepper.backward(second)
    loss, norm = stepper.result()
    assert engine.optimizer.steps == 1
    assert norm == pytest.approx(float(torch.nn.utils.get_total_norm(grads)), rel=1e-5)
    assert math.isfinite(float(loss))

    first, second = micro_losses(engine, 2)
    stepper.backward(first * float("nan"))  # one NaN micro-batch poisons the step's gradients
    stepper.backward(second)
    loss, norm = stepper.result()
    assert engine.optimizer.steps == 1  # the update was a no-op
    assert engine.micro_steps == 4  # while DeepSpeed's own counters advanced
    assert not math.isfinite(norm) and not math.isfinite(float(loss))
    assert Health(max_bad=5).update(norm) is True

    for loss in micro_losses(engine, 2):  # the optimizer's real step is back for the next step
        stepper.backward(loss)
    assert math.isfinite(stepper.result()[1]) and engine.optimizer.steps == 2


def test_stepper_under_zero2_leaves_the_skip_to_deepspeed_and_reports_its_norm():
    engine = FakeEngine(stage=2, accum=2, global_norm=float("inf"))
    stepper = Stepper(engine, accum=2)
    first, second = micro_losses(engine, 2)
    stepper.backward(first * float("nan"))
    stepper.backward(second)
    _, norm = stepper.result()
    assert norm == float("inf")  # get_global_grad_norm's value, as ZeRO reports it
    assert engine.optimizer.steps == 1  # ZeRO's optimizer decides on the skip inside its own step


# --------------------------------------------------------------------------------------------------
# loop.Window: per-step losses reduced once per log line


@pytest.fixture
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_window_reduces_to_the_mean_and_an_empty_window_is_nan(process_group):
    window = Window(torch.device("cpu"))
    window.add(torch.tensor(2.0))
    window.add(torch.tensor(3.5, dtype=torch.bfloat16))
    assert window.reduce() == pytest.approx(2.75)
    assert math.isnan(window.reduce())  # reset, and a window of only skipped steps is NaN, not 0
    window.add(torch.tensor(1.25))
    assert window.reduce() == pytest.approx(1.25)  # the earlier window's steps are not in it


# --------------------------------------------------------------------------------------------------
# models.model_config / describe: the facts of the model that is really trained


@pytest.mark.parametrize("name, vocab, seq_len",
                         [("tiny", 512, 256), ("demo", 8192, 512), ("124m", 50257, 1024)])
def test_describe_agrees_with_the_counts_from_the_yaml(name, vocab, seq_len):
    cfg = load_config(ROOT / "configs/model" / f"{name}.yaml", ModelConfig)
    facts = describe(model_config(cfg, None, vocab, 0, None, seq_len), seq_len)
    counts = num_params(cfg, vocab)
    assert facts["total"] == counts["total"] and facts["non_embedding"] == counts["non_embedding"]
    assert facts["embedding"] == counts["embedding"] and facts["matmul"] == counts["matmul"]
    assert facts["flops_per_token"] == flops_per_token(cfg, vocab, seq_len)


@pytest.fixture
def gpt2_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=2, vocab_size=512))
    model.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2", sum(p.numel() for p in model.parameters())


def test_init_from_facts_come_from_the_folder(gpt2_folder):
    folder, params = gpt2_folder
    config = model_config(None, folder, 512, 0, None, 16)
    assert config.model_type == "gpt2" and config.n_positions == 32 and config.n_embd == 32
    assert describe(config, 16)["total"] == params
    # a model section that says the same as the folder is accepted
    same = ModelConfig(family="gpt2", hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32)
    assert model_config(same, folder, 512, 0, None, 16).n_positions == 32


def test_init_from_refusals_name_the_clash(gpt2_folder, tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    folder, _ = gpt2_folder
    with pytest.raises(ModelError, match=r"data.seq_len 64 .* 32 positions \(max_position_embeddings\)"):
        model_config(None, folder, 512, 0, None, 64)
    llama = ModelConfig(family="llama", hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32)
    with pytest.raises(ModelError, match="contradicts init_from .*model says 'llama', the folder 'gpt2'"):
        model_config(llama, folder, 512, 0, None, 16)
    wider = ModelConfig(family="gpt2", hidden_size=64, num_layers=2, num_heads=2, max_seq_len=32)
    with pytest.raises(ModelError, match="hidden_size: model says 64, the folder 32"):
        model_config(wider, folder, 512, 0, None, 16)
    with pytest.raises(ModelError, match="vocab_size 512, the data's tokenizer has 1000"):
        model_config(None, folder, 1000, 0, None, 16)
    with pytest.raises(ModelError, match="no config.json"):
        model_config(None, tmp_path, 512, 0, None, 16)
    classifier = tmp_path / "classifier"
    GPT2ForSequenceClassification(GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=2, vocab_size=512,
                                             num_labels=2)).save_pretrained(classifier)
    with pytest.raises(ModelError, match="GPT2ForSequenceClassification, not a causal language model"):
        model_config(None, classifier, 512, 0, None, 16)


# --------------------------------------------------------------------------------------------------
# checkpoint.export_hf + parity: task-generic export, the weights' dtype, like-with-like check

TINY = {"gpt2": dict(family="gpt2", hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32),
        "llama": dict(family="llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      max_seq_len=32, tie_embeddings=False)}


def perturb_one_weight(folder):
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if ".mlp." in k)
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_records_the_dtype_and_reproduces_the_logits(family, dtype, tmp_path):
    from safetensors.torch import load_file

    config = model_config(ModelConfig(**TINY[family]), None, 128, 0, None, 16)
    torch.manual_seed(0)
    model = build(config).eval()
    state_dict = {k: v.to(dtype) for k, v in model.state_dict().items()}
    # the engine's model: DeepSpeed casts parameters only; `.to(dtype)` would also cast RoPE's inv_freq
    # buffer, which a reload keeps in fp32 (logits 2e-3 off in bf16)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    (tmp_path / "tok").mkdir()
    out = tmp_path / "final"
    ckpt.export_hf(out, config, state_dict, tmp_path / "tok", {"stage": "test"}, None)
    name = str(dtype).removeprefix("torch.")
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {dtype}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    assert json.loads((out / "lineage.json").read_text()) == {"stage": "test"}
    assert ckpt.parity(out, ids, logits, torch.device("cpu"), dtype) == 0.0
    assert (tmp_path / "export_parity.safetensors").is_file()
    perturb_one_weight(out)
    assert ckpt.parity(out, ids, logits, torch.device("cpu"), dtype) > 1e-3


def test_a_gpt2_export_gets_lmforges_generation_config(tmp_path):
    config = model_config(ModelConfig(**TINY["gpt2"]), None, 128, 0, None, 16)  # eos 0, no pad token
    (tmp_path / "tok").mkdir()
    ckpt.export_hf(tmp_path / "final", config, build(config).state_dict(), tmp_path / "tok", {}, None)
    generation = json.loads((tmp_path / "final" / "generation_config.json").read_text())
    assert generation["pad_token_id"] == 0  # pad falls back to eos: generate() pads batches without a warning


def exported_classifier(tmp_path):
    """(tmp_path/final: a tiny GPT-2 sequence classifier exported by lmforge, the model, inputs, its logits)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=2, vocab_size=128, num_labels=3,
                        pad_token_id=0, architectures=["GPT2ForSequenceClassification"])
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config).eval()
    ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    (tmp_path / "tok").mkdir()
    ckpt.export_hf(tmp_path / "final", config, model.state_dict(), tmp_path / "tok", {}, None)
    return tmp_path / "final", model, ids, logits


def test_export_of_a_sequence_classifier_reloads_as_one_without_a_generation_config(tmp_path):
    from transformers import AutoModelForSequenceClassification

    out, model, ids, logits = exported_classifier(tmp_path)
    assert not (out / "generation_config.json").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(reloaded).__name__ == "GPT2ForSequenceClassification" and reloaded.config.num_labels == 3
    assert torch.equal(reloaded.score.weight, model.score.weight)
    assert ckpt.parity(out, ids, logits, torch.device("cpu"), torch.float32) == 0.0


# --------------------------------------------------------------------------------------------------
# run.Plan: batch arithmetic, precision, DeepSpeed config and the resume checks, before any work


def test_plan_resolves_the_launch_and_the_checks_a_resume_must_pass(monkeypatch):
    from lmforge.checkpoint import config_digest
    from lmforge.run import Plan

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")  # RANK set: the launcher mapping (Slurm, MPI) leaves the world alone
    monkeypatch.setenv("LOCAL_RANK", "0")
    engine_cfg = EngineConfig(deepspeed=ROOT / "configs/deepspeed/zero2.json", precision="fp32")
    optim = OptimConfig(lr=1e-3, grad_clip=0.5)
    plan = Plan.make(BatchConfig(micro_batch_size=2, global_batch_size=12), engine_cfg, optim)
    assert (plan.world, plan.micro, plan.accum, plan.global_batch) == (2, 2, 3, 12)
    assert plan.dtype == torch.float32 and plan.precision == "float32" and plan.zero_stage == 2
    assert plan.ds["train_batch_size"] == 12 and plan.ds["gradient_accumulation_steps"] == 3
    assert plan.ds["gradient_clipping"] == 0.5 and plan.ds["bf16"] == {"enabled": False}
    derived = Plan.make(BatchConfig(micro_batch_size=4, grad_accum=3), engine_cfg, optim)
    assert (derived.micro, derived.accum, derived.global_batch) == (4, 3, 24)  # 4 x 3 x 2 ranks

    hf_config = model_config(ModelConfig(**TINY["llama"]), None, 128, 0, None, 16)
    checks = plan.resume_checks(hf_config, seed=7)
    assert set(checks) == {"model_digest", "seed", "dtype", "global_batch_size", "zero_stage"}
    assert {k: v for k, (v, _) in checks.items()} == {
        "model_digest": (config_digest(hf_config),), "seed": 7, "dtype": "float32", "global_batch_size": 12,
        "zero_stage": 2}
    assert all(why for _, why in checks.values())  # each refusal says why and what to do
    other = model_config(ModelConfig(**TINY["gpt2"]), None, 128, 0, None, 16)
    assert set(plan.resume_checks(other, seed=7)["model_digest"][0]).isdisjoint(checks["model_digest"][0])


def test_a_gpt2_checkpoint_recorded_with_gelu_new_resumes_with_gelu_pytorch_tanh(tmp_path, monkeypatch):
    """lmforge built GPT-2 with gelu_new before: a checkpoint whose record holds that config's digest (written
    then, by config_digest as it is) is the same model to a launch that builds gelu_pytorch_tanh; another
    activation is refused."""
    from types import SimpleNamespace

    from lmforge.checkpoint import config_digest
    from lmforge.run import Plan, Run, RunError

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    plan = Plan.make(BatchConfig(micro_batch_size=2, global_batch_size=2),
                     EngineConfig(deepspeed=ROOT / "configs/deepspeed/zero2.json", precision="fp32"), OptimConfig(lr=1e-3))
    now = model_config(ModelConfig(**TINY["gpt2"]), None, 128, 0, None, 16)
    assert now.activation_function == "gelu_pytorch_tanh"
    checks = plan.resume_checks(now, seed=7)
    record = {k: (v[0] if k == "model_digest" else v) for k, (v, _) in checks.items()}
    monkeypatch.setattr("lmforge.run._engine", lambda: SimpleNamespace(broadcast_object=lambda o: o))

    def resume(activation: str) -> None:
        old = now.__class__.from_dict({**now.to_dict(), "activation_function": activation})
        run = Run("pretrain", tmp_path, SimpleNamespace(is_main=True, rank=0, world=1), 0.0,
                  resume=SimpleNamespace(path=tmp_path / "step-2", record={**record, "model_digest": config_digest(old)}))
        run.close = lambda code=0: code
        run.check_resume(checks)

    resume("gelu_new")
    with pytest.raises(RunError, match="different model config"):
        resume("relu")


def test_a_model_section_whose_mlp_or_norm_contradicts_a_gpt2_folder_is_refused(tmp_path):
    """GPT-2 keeps its MLP width as n_inner (None: 4 x hidden) and its epsilon as layer_norm_epsilon."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge import models
    from lmforge.config.model import ModelConfig

    GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=2, vocab_size=128)).save_pretrained(tmp_path)
    same = dict(family="gpt2", hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32, norm_eps=1e-5)
    assert models.model_config(ModelConfig(**same), tmp_path, 128, 0, None, 16).n_embd == 32  # n_inner None == 4h
    with pytest.raises(models.ModelError, match="mlp width"):
        models.model_config(ModelConfig(**same, intermediate_size=999), tmp_path, 128, 0, None, 16)
    with pytest.raises(models.ModelError, match="norm epsilon"):
        models.model_config(ModelConfig(**{**same, "norm_eps": 1e-6}), tmp_path, 128, 0, None, 16)


def test_a_config_saved_without_architectures_exports_as_a_causal_lm():
    """Checkpoints of an earlier lmforge saved config.json with `architectures` null: `lmforge export` must
    still rebuild them (as the causal LM they are), not refuse."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    assert ckpt.model_class(GPT2Config()) is GPT2LMHeadModel
    assert ckpt.model_class(LlamaConfig()) is LlamaForCausalLM
    assert ckpt.generative(GPT2Config())


def test_parity_of_a_model_larger_than_the_free_gpu_memory_runs_on_cpu_in_the_same_dtype(tmp_path, monkeypatch):
    """A 70B export on one GPU: the reload does not fit beside what is left of the device, so parity runs on
    the CPU, still in the engine's dtype. (Here there is no GPU: without the fallback, `.to("cuda")` raises.)"""
    final, _, ids, logits = exported_classifier(tmp_path)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (1024, 80 << 30))
    assert ckpt.parity(final, ids, logits, torch.device("cuda", 0), torch.float32) == 0.0
    assert asked == [torch.device("cuda", 0)]  # it looked at the device's free memory (1 KiB) first
