"""Schema of a model size (`configs/model/*.yaml`): the architecture, built as transformers' own classes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config.base import StrictModel


class ModelConfig(StrictModel):
    """A decoder-only transformer: Llama-style (RoPE, RMSNorm, SwiGLU, GQA) or GPT-2-style (learned positions, LayerNorm, GELU)."""

    family: Literal["llama", "gpt2"] = "llama"
    """Architecture: `llama` builds LlamaForCausalLM, `gpt2` builds GPT2LMHeadModel."""
    hidden_size: int = Field(ge=8)
    """Width of the residual stream (d_model)."""
    num_layers: int = Field(ge=1)
    """Transformer blocks."""
    num_heads: int = Field(ge=1)
    """Attention (query) heads; hidden_size must divide by it."""
    num_kv_heads: int | None = Field(None, ge=1)
    """Key/value heads for grouped-query attention (llama only); default: num_heads (plain multi-head)."""
    intermediate_size: int | None = Field(None, ge=1)
    """MLP width; default: 4 x hidden (gpt2) or 8/3 x hidden rounded up to a multiple of 64 (llama, SwiGLU)."""
    max_seq_len: int = Field(2048, ge=8)
    """Context length in tokens (position embeddings for gpt2, RoPE range for llama)."""
    vocab_size: int | None = Field(None, ge=2)
    """Vocabulary size; default: the tokenized data's. A value that contradicts the data is an error."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection (saves vocab x hidden parameters)."""
    rope_theta: float = Field(10_000.0, gt=0)
    """RoPE base frequency (llama only)."""
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of RMSNorm / LayerNorm."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on attention and residual paths (pretraining usually uses 0)."""
    init_std: float = Field(0.02, gt=0)
    """Standard deviation of the normal weight initialisation."""

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not divide into num_heads {self.num_heads}")
        if self.num_kv_heads is not None:
            if self.family != "llama":
                raise ValueError("num_kv_heads (grouped-query attention) is for family: llama only")
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_heads {self.num_heads} does not divide into num_kv_heads {self.num_kv_heads}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.family == "gpt2":
            return 4 * self.hidden_size
        return -(-8 * self.hidden_size // 3 // 64) * 64
