"""Model building, parameter counts and FLOPs per token: computed in one place, checked against torch."""

from __future__ import annotations

import pytest
import torch
import yaml

from lmforge.config.model import ModelConfig
from lmforge.models import build_model, flops_per_token, num_params

from ..conftest import ROOT

VARIANTS = [
    dict(family="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, tie_embeddings=True),
    dict(family="llama", hidden_size=64, num_layers=3, num_heads=4, tie_embeddings=False, intermediate_size=96),
    dict(family="gpt2", hidden_size=64, num_layers=2, num_heads=4, max_seq_len=128, tie_embeddings=True),
    dict(family="gpt2", hidden_size=32, num_layers=1, num_heads=2, max_seq_len=64, tie_embeddings=False),
]


@pytest.mark.parametrize("spec", VARIANTS, ids=lambda s: f"{s['family']}-tied{s['tie_embeddings']}")
def test_parameter_count_matches_the_built_model(spec):
    cfg = ModelConfig(**spec)
    model = build_model(cfg, vocab_size=300)
    counted = num_params(cfg, 300)
    assert counted["total"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert counted["embedding"] == embeddings
    tied_out = 300 * cfg.hidden_size if cfg.tie_embeddings else 0  # the output projection is a matmul even when tied
    assert counted["matmul"] == counted["total"] - embeddings + tied_out


def test_built_model_is_the_transformers_class_with_sdpa_and_gqa():
    llama = build_model(ModelConfig(**VARIANTS[0]), vocab_size=300)
    assert type(llama).__name__ == "LlamaForCausalLM" and llama.config._attn_implementation == "sdpa"
    assert llama.config.num_key_value_heads == 2 and llama.lm_head.weight is llama.get_input_embeddings().weight
    gpt2 = build_model(ModelConfig(**VARIANTS[2]), vocab_size=300)
    assert type(gpt2).__name__ == "GPT2LMHeadModel" and gpt2.config.n_positions == 128


def test_gpt2_computes_gelu_new_in_one_kernel_and_keeps_less_for_backward():
    """GPT-2's MLP activation is gelu_new's function in torch's fused kernel: the same outputs (5e-7), and the
    activation keeps a quarter of what gelu_new's Python formula keeps for backward (fp32)."""
    from transformers.activations import ACT2FN

    gpt2 = build_model(ModelConfig(**VARIANTS[2]), vocab_size=300)
    assert gpt2.config.activation_function == "gelu_pytorch_tanh"
    x = torch.randn(2, 16, 4 * 64, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.allclose(ACT2FN["gelu_new"](x), gpt2.transformer.h[0].mlp.act(x), atol=5e-7, rtol=0)

    def saved(act) -> int:  # bytes autograd keeps for backward of act(x), x itself included once
        kept = {}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (kept.setdefault(t.data_ptr(), t.nbytes), t)[1],
                                                      lambda t: t):
            act(x.clone().requires_grad_(True)).sum()
        return sum(kept.values())

    assert saved(gpt2.transformer.h[0].mlp.act) * 3 <= saved(ACT2FN["gelu_new"])


def test_flops_per_token_is_6n_plus_attention():
    cfg = ModelConfig(family="llama", hidden_size=128, num_layers=4, num_heads=4)
    n = num_params(cfg, 1000)["matmul"]
    assert flops_per_token(cfg, 1000, 256) == 6 * n + 12 * 4 * 128 * 256
    # GPT-2 small, the usual reference: ~124 M parameters, ~0.85 GFLOPs per token at 1024 context
    gpt2 = ModelConfig(**yaml.safe_load((ROOT / "configs/model/124m.yaml").read_text()))
    assert num_params(gpt2, 50257)["total"] == 124_439_808
    assert flops_per_token(gpt2, 50257, 1024) == pytest.approx(0.85e9, rel=0.03)


@pytest.mark.parametrize("name, low, high", [("tiny", 0.05e6, 1e6), ("demo", 2e6, 8e6), ("124m", 120e6, 130e6),
                                             ("350m", 340e6, 370e6), ("1b", 1.0e9, 1.2e9), ("7b", 6.5e9, 7e9)])
def test_shipped_sizes_are_the_sizes_they_claim(name, low, high):
    cfg = ModelConfig(**yaml.safe_load((ROOT / "configs/model" / f"{name}.yaml").read_text()))
    vocab = {"tiny": 512, "demo": 8192, "124m": 50257, "350m": 50257}.get(name, 32000)
    assert low <= num_params(cfg, vocab)["total"] <= high


def test_impossible_shapes_are_config_errors():
    with pytest.raises(ValueError, match="does not divide into num_heads"):
        ModelConfig(hidden_size=100, num_layers=1, num_heads=3)
    with pytest.raises(ValueError, match="for family: llama only"):
        ModelConfig(family="gpt2", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("draw", ["normal_", "uniform_", "kaiming_uniform_"])
def test_host_draws_give_the_fp32_host_build_numbers_in_any_dtype(draw):
    """Under ZeRO-3 the modules are built in the run's precision (on its device): drawing there would give
    other weights than today's fp32 build on the host, cast afterwards. `host_draws` draws as that build."""
    from lmforge.models import host_draws

    def drawn(dtype):
        torch.manual_seed(0)
        t = torch.empty(61, 33, dtype=dtype)  # 2,013 elements: torch draws differently below fp32 here
        getattr(torch.nn.init, draw)(t) if draw.startswith("kaiming") else getattr(t, draw)()
        return t, torch.get_rng_state()

    want, rng = drawn(torch.float32)
    # torch's own low-precision draws give other numbers (the reason for host_draws)
    assert any(not torch.equal(drawn(dtype)[0], want.to(dtype)) for dtype in (torch.bfloat16, torch.float16))
    for dtype in (torch.bfloat16, torch.float16):
        original = torch.Tensor.normal_, torch.Tensor.uniform_
        with host_draws():
            got, rng_after = drawn(dtype)
        assert (torch.Tensor.normal_, torch.Tensor.uniform_) == original  # put back on the way out
        assert got.dtype == dtype and torch.equal(got, want.to(dtype)) and torch.equal(rng_after, rng)


def test_a_draw_into_a_partitioned_parameter_that_is_not_gathered_is_an_error():
    from lmforge.models import ModelError, host_draws

    placeholder = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves in a module between gathers
    placeholder.ds_numel, placeholder.ds_shape = 12, (3, 4)
    with host_draws(), pytest.raises(ModelError, match=r"shape \(3, 4\) that is not gathered"):
        torch.nn.init.normal_(placeholder)


def test_model_context_switches_transformers_to_zero3_only_inside_and_only_for_zero3():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from lmforge import engine

    cfg = ModelConfig(**VARIANTS[2])
    torch.manual_seed(3)
    plain = build_model(cfg, vocab_size=300).state_dict()
    with engine.model_context({"zero_optimization": {"stage": 2}}):
        assert not is_deepspeed_zero3_enabled()
        torch.manual_seed(3)
        inside = build_model(cfg, vocab_size=300).state_dict()
    assert all(torch.equal(plain[k], inside[k]) for k in plain)
    zero3 = {"zero_optimization": {"stage": 3}}
    with pytest.raises(RuntimeError, match="boom"), engine.model_context(zero3):
        assert is_deepspeed_zero3_enabled()
        with pytest.raises(engine.EngineError, match="already registered"), engine.model_context(zero3):
            pass
        raise RuntimeError("boom")
    assert not is_deepspeed_zero3_enabled()  # switched off again, even on an error
