"""Fine-tuning examples (lmforge/data/examples.py): reading, the errors a user gets for bad input, the response-only
mask of SFT, truncation, batching; and the config's refusals."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from lmforge.config.finetune import FinetuneConfig, FinetuneDataConfig, SplitSource, TaskConfig
from lmforge.data import examples as fd
from lmforge.data.sources import DataError
from tests.conftest import write_jsonl


@pytest.fixture
def tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert tok.chat_template is None
    tok.chat_template = fd.DEFAULT_CHAT_TEMPLATE
    return tok


def data_cfg(tmp_path, **kw) -> FinetuneDataConfig:
    return FinetuneDataConfig(train=str(tmp_path / "train.jsonl"), **kw)


def test_a_bad_line_a_missing_field_or_bad_utf8_names_the_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        fd.read_split(SplitSource(path=path))
    path.write_text('{"text": "a", "label": "x"}\n\n{"body": "b", "label": "y"}\n')
    records = fd.read_split(SplitSource(path=path))
    assert [w for w, _ in records] == [f"{path}:1", f"{path}:3"]  # blank lines skipped, numbers kept
    with pytest.raises(DataError, match=rf"{path}:3: no field 'text' \(fields: body, label\)"):
        fd.encode_classification(records, tokenizer, TaskConfig(type="classification"), data_cfg(tmp_path),
                                 ["x", "y"], "train")
    path.write_bytes(b'{"text": "caf\xe9", "label": "x"}\n')
    with pytest.raises(DataError, match="invalid UTF-8"):
        fd.read_split(SplitSource(path=path))
    (tmp_path / "t.tsv").write_text("x")
    with pytest.raises(DataError, match="unknown format '.tsv'"):
        fd.read_split(SplitSource(path=tmp_path / "t.tsv"))


def test_csv_and_parquet_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "one, two", "label": "a"}, {"text": "three", "label": "b"}]
    (tmp_path / "t.csv").write_text('text,label\n"one, two",a\nthree,b\n')
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    csv_rows = fd.read_split(SplitSource(path=tmp_path / "t.csv"))
    assert [r for _, r in csv_rows] == rows and csv_rows[1][0].endswith("t.csv:3")
    assert [r for _, r in fd.read_split(SplitSource(path=tmp_path / "t.parquet"))] == rows


def test_a_validation_label_training_never_saw_and_an_empty_split_are_refused(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}])
    write_jsonl(tmp_path / "val.jsonl", [{"text": "d", "label": "x"}, {"text": "e", "label": "z"}])
    cfg = data_cfg(tmp_path, validation=str(tmp_path / "val.jsonl"))
    records = fd.load_records(cfg, seed=0)
    labels = fd.label_set(records["train"], cfg)
    assert labels == ["x", "y"]
    with pytest.raises(DataError, match=r"val.jsonl:2: label 'z' never occurs in the train split"):
        fd.encode_classification(records["validation"], tokenizer, TaskConfig(type="classification"), cfg, labels,
                                 "validation")
    (tmp_path / "val.jsonl").write_text("\n")
    with pytest.raises(DataError, match="val.jsonl: the validation split is empty"):
        fd.load_records(cfg, seed=0)


def test_validation_is_carved_from_train_by_a_seeded_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": str(i), "label": "x"} for i in range(20)])
    cfg = data_cfg(tmp_path, val_fraction=0.25)
    a, b = fd.load_records(cfg, seed=1), fd.load_records(cfg, seed=1)
    assert len(a["validation"]) == 5 and len(a["train"]) == 15 and a == b
    assert not {w for w, _ in a["validation"]} & {w for w, _ in a["train"]}  # no example in both


def test_sft_trains_on_the_response_tokens_alone(tmp_path, tokenizer):
    records = [("x:1", {"prompt": "reverse abc", "response": "cba"})]
    ex = fd.encode_sft(records, tokenizer, TaskConfig(type="sft", max_length=64), data_cfg(tmp_path), keep_prompts=1)
    ids, targets = ex.ids[0], ex.targets[0]
    answer = targets != fd.IGNORE
    assert (targets[answer] == ids[answer]).all()
    assert tokenizer.decode(ids[answer]) == "cba" + tokenizer.eos_token  # the response and its end, nothing else
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "reverse abc"}], tokenize=False,
                                           add_generation_prompt=True)
    assert tokenizer.decode(ids[~answer]) == prompt == "### Instruction:\nreverse abc\n\n### Response:\n"
    assert tokenizer.decode(ex.prompts[0]) == prompt and ex.answers == ["cba"]
    assert ex.target_tokens(0) == int(answer.sum())


def test_chat_messages_learn_every_assistant_turn_and_need_roles(tmp_path, tokenizer):
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
             {"role": "assistant", "content": "ciao"}]
    cfg = data_cfg(tmp_path, messages_field="messages")
    ex = fd.encode_sft([("x:1", {"messages": convo})], tokenizer, TaskConfig(type="sft", max_length=128), cfg)
    ids, targets = ex.ids[0], ex.targets[0]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(convo, tokenize=False)
    learned = tokenizer.decode(ids[targets != fd.IGNORE])
    assert learned == f"hello{tokenizer.eos_token}ciao{tokenizer.eos_token}"
    bad = [{"role": "user", "content": "hi"}, {"content": "no role"}]
    with pytest.raises(DataError, match=r"x:7: messages\[1\] needs a role"):
        fd.encode_sft([("x:7", {"messages": bad})], tokenizer, TaskConfig(type="sft"), cfg)
    with pytest.raises(DataError, match="x:8: messages has no assistant message"):
        fd.encode_sft([("x:8", {"messages": convo[:2]})], tokenizer, TaskConfig(type="sft"), cfg)


def test_truncation_right_left_or_error_and_counted(tmp_path, tokenizer):
    long = {"prompt": "word " * 60, "response": "end"}
    records = [("x:1", long), ("x:2", {"prompt": "short", "response": "ok"})]
    cfg = data_cfg(tmp_path)
    left = fd.encode_sft(records, tokenizer, TaskConfig(type="sft", max_length=32, truncation="left"), cfg)
    assert left.truncated == 1 and len(left.ids[0]) == 32 and len(left.ids[1]) < 32
    assert tokenizer.decode(left.ids[0][left.targets[0] != fd.IGNORE]) == "end" + tokenizer.eos_token
    with pytest.raises(DataError, match=r"x:1: no response token left .* \(right truncation cut it off"):
        fd.encode_sft(records, tokenizer, TaskConfig(type="sft", max_length=32, truncation="right"), cfg)
    with pytest.raises(DataError, match=r"x:1: \d+ tokens, more than task.max_length=32"):
        fd.encode_sft(records, tokenizer, TaskConfig(type="sft", max_length=32, truncation="error"), cfg)
    cls = fd.encode_classification([("x:1", {"text": "word " * 60, "label": "a"})], tokenizer,
                                   TaskConfig(type="classification", max_length=10), cfg, ["a"], "train")
    assert cls.truncated == 1 and len(cls.ids[0]) == 10


def test_batches_are_right_padded_and_padding_is_never_a_target(tmp_path, tokenizer):
    records = [("x:1", {"prompt": "reverse abcdef", "response": "fedcba"}), ("x:2", {"prompt": "r", "response": "a"})]
    ex = fd.encode_sft(records, tokenizer, TaskConfig(type="sft", max_length=64), data_cfg(tmp_path))
    x, y = fd.batch(ex, [0, 1], pad_id=1, sft=True)
    width = max(len(i) for i in ex.ids)
    assert x.shape == y.shape == (2, width - 1)
    short = len(ex.ids[1])
    assert (x[1, short:] == 1).all() and (y[1, short - 1:] == fd.IGNORE).all()
    assert (y != fd.IGNORE).sum() == ex.target_tokens(0) + ex.target_tokens(1)
    cls = fd.Examples([ex.ids[0], ex.ids[1]], [2, 0])
    x, y = fd.batch(cls, [1, 0], pad_id=1, sft=False)
    assert x.shape == (2, width) and y.tolist() == [0, 2] and (x[0, short:] == 1).all()


def test_the_config_refuses_contradictions_before_any_work(tmp_path):
    base = {"run_dir": str(tmp_path / "r"), "init_from": str(tmp_path)}
    with pytest.raises(ValidationError, match="exactly one of `builtin`"):
        FinetuneConfig(**base, task={"type": "sft"}, data={})
    with pytest.raises(ValidationError, match="is a sft task, but task.type is classification"):
        FinetuneConfig(**base, task={"type": "classification"}, data={"builtin": "stdlib-docstring-name"})
    with pytest.raises(ValidationError, match="exactly one of train.max_steps or train.epochs"):
        FinetuneConfig(**base, task={"type": "sft"}, data={"train": "x.jsonl"}, train={"max_steps": 3, "epochs": 1})
    with pytest.raises(ValidationError, match="exactly one of `path`"):
        FinetuneConfig(**base, task={"type": "sft"}, data={"train": {"path": "a.jsonl", "hf": "glue"}})
    ok = FinetuneConfig(**base, task={"type": "sft"}, data={"train": "x.jsonl"})
    assert ok.data.train.path.name == "x.jsonl" and ok.train.epochs == 1
    assert json.loads(ok.model_dump_json())["task"]["truncation"] == "right"


def test_a_hub_dataset_reads_through_datasets_and_a_missing_one_says_it_must_be_cached(tmp_path):
    """`hf:` goes through `datasets.load_dataset` (a local dataset folder here: nothing may download)."""
    folder = tmp_path / "my_dataset"
    write_jsonl(folder / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    rows = fd.read_split(SplitSource(hf=str(folder), split="train"))
    assert [r for _, r in rows] == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    assert rows[1][0] == f"{folder}:train row 1"
    with pytest.raises(DataError, match="must be in the datasets cache already"):
        fd.read_split(SplitSource(hf="no-such-org/no-such-dataset", split="train"))
