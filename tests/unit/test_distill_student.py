"""The student's start (distill/student.py): chosen teacher layers copied into a Hugging Face folder, for Llama- and
GPT-2-style causal LMs and classifiers; and the identities a distillation checks (weights digest, vocabulary)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from distill.student import from_teacher, subset_config
from lmforge.checkpoint import weights_digest
from lmforge.models import ModelError
from lmforge.tokenizer import vocabulary_hash


def llama(tmp_path, tiny_tokenizer, layers=4, classifier=False):
    out = tmp_path / ("cls" if classifier else "lm")
    shutil.copytree(tiny_tokenizer, out)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=0,
                         pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    if classifier:
        config.num_labels, config.id2label = 3, {0: "alpha", 1: "beta", 2: "gamma"}
        config.label2id = {v: k for k, v in config.id2label.items()}
        LlamaForSequenceClassification(config).save_pretrained(out)
    else:
        LlamaForCausalLM(config).save_pretrained(out)
    return out


def student_from(teacher, layers, out):
    config = AutoConfig.from_pretrained(teacher)
    from_teacher(teacher, config, layers, out, {"layers": layers})
    return out


IDS = torch.tensor([[5, 17, 300, 2, 9, 44, 101, 7]])


@pytest.mark.parametrize("classifier", [False, True], ids=["causal-lm", "classifier"])
def test_a_student_of_every_layer_is_the_teacher(tmp_path, tiny_tokenizer, classifier):
    teacher = llama(tmp_path, tiny_tokenizer, classifier=classifier)
    student = student_from(teacher, [0, 1, 2, 3], tmp_path / "student")
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    a, b = auto.from_pretrained(teacher), auto.from_pretrained(student)
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)
    if classifier:
        assert b.config.id2label == a.config.id2label
    assert vocabulary_hash(student) == vocabulary_hash(teacher)


def test_chosen_layers_land_in_order_with_embeddings_and_head(tmp_path, tiny_tokenizer):
    teacher = llama(tmp_path, tiny_tokenizer)
    student = student_from(teacher, [3, 1], tmp_path / "student")
    t, s = AutoModelForCausalLM.from_pretrained(teacher), AutoModelForCausalLM.from_pretrained(student)
    assert s.config.num_hidden_layers == 2
    for j, i in enumerate([3, 1]):
        for (name, p), (_, q) in zip(s.model.layers[j].named_parameters(), t.model.layers[i].named_parameters(),
                                     strict=True):
            assert torch.equal(p, q), name
    assert torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight)
    assert torch.equal(s.lm_head.weight, t.lm_head.weight) and torch.equal(s.model.norm.weight, t.model.norm.weight)
    assert (student / "student_init.json").is_file()


def test_gpt2_layers_are_copied_too(tmp_path, tiny_tokenizer):
    teacher = tmp_path / "gpt2"
    shutil.copytree(tiny_tokenizer, teacher)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=3, n_head=4, n_positions=64)).save_pretrained(teacher)
    student = student_from(teacher, [0, 2], tmp_path / "student")
    t, s = AutoModelForCausalLM.from_pretrained(teacher), AutoModelForCausalLM.from_pretrained(student)
    assert s.config.n_layer == 2
    assert torch.equal(s.transformer.h[1].attn.c_attn.weight, t.transformer.h[2].attn.c_attn.weight)
    assert torch.equal(s.transformer.wpe.weight, t.transformer.wpe.weight)


def test_a_layer_out_of_range_or_repeated_is_refused(tmp_path, tiny_tokenizer):
    teacher = llama(tmp_path, tiny_tokenizer)
    config = AutoConfig.from_pretrained(teacher)
    with pytest.raises(ModelError, match=r"\[4\] out of range.*4 layers \(indices 0 to 3\)"):
        subset_config(config, [0, 4], teacher)
    with pytest.raises(ModelError, match="repeats a layer"):
        subset_config(config, [1, 1], teacher)


def test_the_init_folder_is_rewritten_only_for_another_choice(tmp_path, tiny_tokenizer):
    teacher = llama(tmp_path, tiny_tokenizer)
    out = student_from(teacher, [0, 2], tmp_path / "student")
    first = (out / "model.safetensors").stat().st_mtime_ns
    student_from(teacher, [0, 2], out)
    assert (out / "model.safetensors").stat().st_mtime_ns == first  # the same choice: kept
    student_from(teacher, [1, 3], out)
    s, t = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(teacher)
    assert torch.equal(s.model.layers[0].mlp.up_proj.weight, t.model.layers[1].mlp.up_proj.weight)


def test_the_weights_digest_sees_any_training_and_ignores_copies(tmp_path, tiny_tokenizer):
    teacher = llama(tmp_path, tiny_tokenizer)
    copy = tmp_path / "copy"
    shutil.copytree(teacher, copy)
    assert weights_digest(copy) == weights_digest(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.add_(1e-3)  # one tensor in the middle of the file
    model.save_pretrained(copy)
    assert weights_digest(copy) != weights_digest(teacher)


def test_the_vocabulary_hash_ignores_formatting_and_encoding_options_but_not_the_vocabulary(tmp_path, tiny_tokenizer):
    import json

    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text())
    reformatted = tmp_path / "reformatted"
    reformatted.mkdir()
    (reformatted / "tokenizer.json").write_text(json.dumps({**data, "padding": {"length": 7}}, indent=4))
    assert vocabulary_hash(reformatted) == vocabulary_hash(tiny_tokenizer)
    other = tmp_path / "other"
    other.mkdir()
    vocab = dict(data["model"]["vocab"])
    first = next(iter(vocab))
    vocab[first + "x"] = vocab.pop(first)  # one token renamed
    (other / "tokenizer.json").write_text(json.dumps({**data, "model": {**data["model"], "vocab": vocab}}))
    assert vocabulary_hash(other) != vocabulary_hash(tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        vocabulary_hash(tmp_path)
