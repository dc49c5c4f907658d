"""Models: transformers' own classes built from a size config, and their parameter and FLOP counts.

Every model is a `LlamaForCausalLM` or `GPT2LMHeadModel` with PyTorch SDPA attention, so a checkpoint
is natively a Hugging Face model and export is `save_pretrained`. Parameter and FLOP counts live here
and nowhere else: the dry run, the status line's MFU, the model card and the benchmarks all read them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.config.model import ModelConfig


class ModelError(Exception):
    """A model that cannot be built or loaded as configured; the message names the key or folder."""


def hf_config(cfg: ModelConfig, vocab_size: int, eos_id: int | None = None, pad_id: int | None = None):
    """The transformers config for `cfg` (vocab from the data, special ids from its tokenizer)."""
    from transformers import GPT2Config, LlamaConfig

    common = dict(vocab_size=vocab_size, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                  bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True)
    if cfg.family == "gpt2":
        return GPT2Config(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                          n_inner=cfg.mlp_size, n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                          resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                          activation_function="gelu_new", **common)
    return LlamaConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                       intermediate_size=cfg.mlp_size, max_position_embeddings=cfg.max_seq_len,
                       rms_norm_eps=cfg.norm_eps, attention_dropout=cfg.dropout,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, **common)


def build_model(cfg: ModelConfig, vocab_size: int, eos_id: int | None = None, pad_id: int | None = None,
                init_from: Path | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A freshly initialised model (seed the global RNG first for a reproducible init), or one loaded
    from a Hugging Face folder whose architecture must match `cfg` and the data's vocabulary."""
    from transformers import AutoModelForCausalLM

    if init_from is not None:
        folder = Path(init_from)
        if not (folder / "config.json").is_file():
            raise ModelError(f"init_from: {folder} is not a Hugging Face model folder (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        if model.config.vocab_size != vocab_size:
            raise ModelError(f"init_from: {folder} has vocab_size {model.config.vocab_size}, the data's tokenizer "
                             f"has {vocab_size}; tokenize with that model's tokenizer (tokenizer.pretrained)")
        return model
    config = hf_config(cfg, vocab_size, eos_id, pad_id)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def num_params(cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Parameter counts by kind, from the config alone (no model built; checked against torch in tests).

    `total` counts every parameter once (tied embeddings once). `matmul` counts the parameters that
    take part in a matrix multiply per token: everything except the embedding lookups (tokens and
    positions), plus the output projection even when it is tied to the input embedding.
    """
    h, layers, mlp = cfg.hidden_size, cfg.num_layers, cfg.mlp_size
    head = h // cfg.num_heads
    embed = vocab_size * h
    if cfg.family == "gpt2":
        attn = h * 3 * h + 3 * h + h * h + h                     # fused qkv and out projection, with biases
        ffn = h * mlp + mlp + mlp * h + h                        # up and down, with biases
        norms = 2 * 2 * h                                        # two LayerNorms (weight and bias)
        final_norm, positions = 2 * h, cfg.max_seq_len * h
    else:
        attn = h * h + 2 * h * cfg.kv_heads * head + h * h       # q, k, v (grouped), o; no biases
        ffn = 3 * h * mlp                                        # gate, up, down (SwiGLU)
        norms = 2 * h                                            # two RMSNorms
        final_norm, positions = h, 0
    blocks = layers * (attn + ffn + norms)
    out = 0 if cfg.tie_embeddings else vocab_size * h
    total = embed + positions + blocks + final_norm + out
    return {"total": total, "embedding": embed + positions, "non_embedding": blocks + final_norm,
            "matmul": blocks + final_norm + vocab_size * h}


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward): 6 x matmul parameters + 12 x layers x hidden x
    seq_len for the attention scores and their weighted sum (PaLM appendix B; causal masking not
    subtracted, as is usual for MFU)."""
    return 6 * num_params(cfg, vocab_size)["matmul"] + 12 * cfg.num_layers * cfg.hidden_size * seq_len


def human(n: float) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))
