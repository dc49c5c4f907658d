"""Models: transformers' own classes built from a size config, and their parameter and FLOP counts.

Every model is a `LlamaForCausalLM` or `GPT2LMHeadModel` with PyTorch SDPA attention, so a checkpoint
is natively a Hugging Face model and export is `save_pretrained`. Parameter and FLOP counts live here
and nowhere else: the dry run, the status line's MFU, the model card and the benchmarks all read them.
"""

from __future__ import annotations

import contextlib
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
        # gelu_pytorch_tanh is GPT-2's gelu_new (the same tanh approximation, within 5e-7) in one kernel:
        # gelu_new's Python formula keeps three more [tokens, 4 x hidden] fp32 tensors per layer for backward
        # (~1.8 GB of a 124M step at 4 x 1,024 tokens); config.json names it, so transformers loads it as is
        return GPT2Config(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                          n_inner=cfg.mlp_size, n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                          resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                          activation_function="gelu_pytorch_tanh", **common)
    return LlamaConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                       intermediate_size=cfg.mlp_size, max_position_embeddings=cfg.max_seq_len,
                       rms_norm_eps=cfg.norm_eps, attention_dropout=cfg.dropout,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, **common)


def build_model(cfg: ModelConfig, vocab_size: int, eos_id: int | None = None, pad_id: int | None = None,
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A freshly initialised model for a size config (seed the global RNG first for a reproducible init);
    `build(model_config(...))` is the same for a stage, with init_from. Inside
    `engine.model_context(ds_config)` under ZeRO-3 it is built partitioned (see `fresh_model`)."""
    return fresh_model(hf_config(cfg, vocab_size, eos_id, pad_id), dtype)


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


def model_config(cfg: ModelConfig | None, init_from: Path | None, vocab_size: int, eos_id: int | None,
                 pad_id: int | None, seq_len: int):
    """The transformers config of the model a stage trains: read from `init_from`'s config.json when given
    (a `model:` section beside it must agree with it), else built from `cfg`. Checks the data's vocabulary
    and `seq_len` against it, so every count, check and card downstream describes the real model."""
    if init_from is None:
        if cfg.vocab_size is not None and cfg.vocab_size != vocab_size:
            raise ModelError(f"model.vocab_size is {cfg.vocab_size} but the data in data.path was tokenized with a {vocab_size}-token "
                             "vocabulary (meta.json); remove model.vocab_size or tokenize with a matching tokenizer")
        config = hf_config(cfg, vocab_size, eos_id, pad_id)
        config.architectures = ["GPT2LMHeadModel" if cfg.family == "gpt2" else "LlamaForCausalLM"]
        return config
    folder = Path(init_from)
    config = folder_config(folder, seq_len, "data.seq_len")
    if config.vocab_size != vocab_size:
        raise ModelError(f"init_from: {folder} has vocab_size {config.vocab_size}, the data's tokenizer has "
                         f"{vocab_size}; tokenize with that model's tokenizer (tokenizer.pretrained)")
    if cfg is not None:
        mine = hf_config(cfg, vocab_size, eos_id, pad_id)
        keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "tie_word_embeddings")
        clash = [f"{k}: model says {getattr(mine, k, None)!r}, the folder {getattr(config, k, None)!r}" for k in keys
                 if getattr(config, k, None) != getattr(mine, k, None)]
        clash += [f"{k}: model says {f(mine)!r}, the folder {f(config)!r}" for k, f in _DERIVED.items()
                  if f(mine) != f(config)]
        if clash:
            raise ModelError(f"the model section contradicts init_from {folder}/config.json ({'; '.join(clash)}); "
                             "remove the model section (the folder's config is the architecture)")
    return config


def folder_config(folder: Path, seq_len: int, seq_key: str):
    """The config of the causal LM in the Hugging Face folder `folder`, checked: a causal LM (not a classifier
    or an encoder), with at least `seq_len` positions (`seq_key` names the setting to change)."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"init_from: {folder} is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    arch = (config.architectures or ["?"])[0]
    if not (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
        raise ModelError(f"init_from: {folder} holds a {arch}, not a causal language model")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise ModelError(f"{seq_key} {seq_len} is longer than {folder}'s {positions} positions "
                         f"(max_position_embeddings); use a shorter {seq_key}")
    return config


# Facts each family stores under its own name (GPT-2: n_inner, None for 4 x hidden; layer_norm_epsilon).
_DERIVED = {
    "mlp width": lambda c: getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size,
    "norm epsilon": lambda c: getattr(c, "rms_norm_eps", None) or getattr(c, "layer_norm_epsilon", None),
}


def describe(config, seq_len: int) -> dict[str, int]:
    """Parameter and FLOP counts of the model `config` builds, counted on the meta device (no memory):
    `total` (tied weights once), `embedding` (token and position lookups), `non_embedding`, `matmul` (what
    takes part in a matrix multiply per token: the output projection even when tied) and
    `flops_per_token` (training: 6 x matmul + 12 x layers x hidden x seq_len, as `flops_per_token`)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    out = model.get_output_embeddings().weight
    untied = 0 if out is model.get_input_embeddings().weight else out.numel()
    non_embedding = total - embedding - untied
    matmul = non_embedding + out.numel()
    flops = 6 * matmul + 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return {"total": total, "embedding": embedding, "non_embedding": non_embedding, "matmul": matmul,
            "flops_per_token": flops}


def build(config, init_from: Path | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model for `config` (from `model_config`): loaded from `init_from`, or freshly initialised (seed
    the global RNG first for a reproducible init). Call inside `engine.model_context` so that under ZeRO-3
    it is built partitioned."""
    if init_from is not None:  # the class `config` names: a causal LM, or a classifier whose body is the folder's
        from lmforge.checkpoint import model_class

        return model_class(config).from_pretrained(init_from, config=config, dtype=dtype, attn_implementation="sdpa")
    return fresh_model(config, dtype)


def lora_config(lora, classification: bool):
    """peft's LoraConfig for the `lora:` settings; a classifier's new head trains in full (modules_to_save)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="SEQ_CLS" if classification else "CAUSAL_LM")


def add_lora(model: torch.nn.Module, lora, classification: bool) -> torch.nn.Module:
    """`model` with LoRA adapters (peft), its own weights frozen. Call outside ZeRO-3's partitioned
    construction: peft initialises B to zero after building it, which a partitioned tensor would ignore;
    DeepSpeed partitions the (small) adapters when the engine starts. Seed first: A is random."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora, classification))


def merge_lora(config, lora, classification: bool, state_dict: dict, adapter_dir: Path, base: str) -> dict:
    """A LoRA model's full state dict -> the adapter alone saved in `adapter_dir` (loadable with
    `PeftModel.from_pretrained` over the model in `base`), and the merged model's state dict (returned).
    Rebuilt on the meta device: no initialisation, no second copy of the weights."""
    from peft import get_peft_model

    from lmforge.checkpoint import model_class

    with torch.device("meta"):
        peft_model = get_peft_model(model_class(config)(config), lora_config(lora, classification))
    missing, unexpected = peft_model.load_state_dict(state_dict, strict=False, assign=True)
    if unexpected or any("lora_" in k or "modules_to_save" in k for k in missing):
        raise ModelError(f"the LoRA model's weights do not fit its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    if missing:  # a tied output layer (it is the embedding) may come back once: tie it again
        peft_model.base_model.model.tie_weights()
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(adapter_dir)
    return peft_model.merge_and_unload().state_dict()


def classifier_config(config, labels: list, pad_id: int):
    """The config of a sequence classifier over `labels` whose body is the causal LM `config` describes
    (transformers' `...ForSequenceClassification` of the same family: it classifies on the last non-pad token,
    so `pad_id` must be set). Label names are kept as id2label / label2id for the exported config."""
    import copy

    import transformers

    cls = transformers.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.get(type(config), None)
    if cls is None:
        raise ModelError(f"transformers has no sequence-classification class for {config.model_type} models")
    out = copy.deepcopy(config)
    out.architectures = [cls.__name__]
    out.num_labels = len(labels)
    out.id2label = {i: str(label) for i, label in enumerate(labels)}
    out.label2id = {str(label): i for i, label in enumerate(labels)}
    out.pad_token_id = pad_id
    return out


# --------------------------------------------------------------------------------------------------
# ZeRO-3: a model built partitioned, with the weights it would have had built whole


def fresh_model(config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A freshly initialised model for the transformers `config` (seed the global RNG first).

    Inside `engine.model_context` under ZeRO-3 each module is partitioned over the ranks as soon as it is
    built (`engine.partitioned_construction`): a rank holds 1/W of the weights plus one module's worth,
    never the whole model. The weights are the same as a whole build's under the same seed, on every
    device and in every precision: the modules draw in the same order from the same generator (the CPU's,
    in fp32: `host_draws`), and transformers' `init_weights`, which runs inside the build after each
    sub-model, sees each module's parameters gathered (`_initialize_weights_gathered`). transformers' own
    ZeRO-3 init would differ: it skips the draws of construction and draws on rank 0's device only."""
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    from lmforge.checkpoint import model_class

    cls = model_class(config)  # the class the config names: a causal LM, or a classifier (fine-tuning from random init)
    if not is_deepspeed_zero3_enabled():
        return cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    from transformers import PreTrainedModel
    from transformers.modeling_utils import set_zero3_state

    from lmforge import engine

    original = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = _initialize_weights_gathered
    try:
        # set_zero3_state: transformers' "zero.Init is already active" flag, so that from_config neither nests
        # its own nor replaces the init with its rank-0-only one
        with host_draws(), engine.partitioned_construction(deepspeed_config()), set_zero3_state():
            return cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    finally:
        PreTrainedModel.initialize_weights = original


@torch.no_grad()
def _initialize_weights_gathered(self) -> None:
    """`PreTrainedModel.initialize_weights` (transformers 5) for a model being built partitioned: the same
    `_initialize_weights` calls on the same modules in the same order (its `smart_apply`: children first,
    a sub-model's own function over its subtree), each with the module's own and its direct children's
    parameters whole, which is what an `_init_weights` touches (GPT-2's scaled `c_proj`) and what
    transformers' own ZeRO-3 init gathers. Every rank draws the same numbers (the RNG stays in step), so
    each makes the full tensors itself and keeps its partition (`engine.materialized`): no communication."""
    from transformers import PreTrainedModel
    from transformers.initialization import guard_torch_init_functions

    from lmforge import engine

    custom = self.is_custom_code()

    def apply(module: torch.nn.Module, fn) -> None:
        for child in module.children():
            apply(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
        if getattr(module, "_is_hf_initialized", False):  # fn would return at once: nothing to gather
            return
        params = list(module.parameters(recurse=False))
        params += [p for child in module.children() if not isinstance(child, PreTrainedModel)
                   for p in child.parameters(recurse=False)]
        with engine.materialized(params):  # every rank draws the same numbers: each keeps its partition
            fn(module, custom)

    with guard_torch_init_functions():
        apply(self, self._initialize_weights)


@contextlib.contextmanager
def host_draws():
    """Random initialisation drawn as a model built on the host in fp32 draws it: from the CPU generator,
    into an fp32 CPU tensor, then copied (cast, moved) into the tensor drawn for, whatever its device and
    dtype. Under `deepspeed.zero.Init` the modules are built on the accelerator in the run's precision;
    without this they would draw from the CUDA generator (other numbers), or in bf16 (other numbers: on
    CPU too, torch's bf16 `normal_` is not the fp32 one cast).

    `Tensor.normal_` and `Tensor.uniform_` are replaced while inside: torch's and transformers'
    initialisers (normal, uniform, kaiming, xavier) draw through them; what an initialiser computes after
    the draw (trunc_normal_'s erfinv) runs where the tensor is. A draw into a partitioned parameter that is
    not gathered (an empty placeholder: it would silently draw nothing) is an error."""
    originals = {name: getattr(torch.Tensor, name) for name in ("normal_", "uniform_")}

    def redirect(name: str, draw):
        def drawn_on_host(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if tensor.numel() == 0 and getattr(tensor, "ds_numel", 0) > 0:
                raise ModelError(f"weight initialisation draws into a ZeRO-3 partitioned parameter of shape "
                                 f"{tuple(tensor.ds_shape)} that is not gathered: this model's _init_weights "
                                 "reaches beyond a module's direct children; train it under ZeRO 0-2")
            if (tensor.device.type == "cpu" and tensor.dtype == torch.float32) or kwargs.get("generator") is not None:
                return draw(tensor, *args, **kwargs)  # already the host's draw, or its caller chose the generator
            host = tensor.new_empty(tensor.shape, dtype=torch.float32, device="cpu")  # not torch.empty: zero.Init casts
            draw(host, *args, **kwargs)
            with torch.no_grad():
                tensor.copy_(host)
            return tensor

        drawn_on_host.__name__ = name
        return drawn_on_host

    for name, draw in originals.items():
        setattr(torch.Tensor, name, redirect(name, draw))
    try:
        yield
    finally:
        for name, draw in originals.items():
            setattr(torch.Tensor, name, draw)
