"""Config loading: includes, overrides, and errors that name the file, line and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmforge.config import ConfigError, load_config, save_config, to_yaml
from lmforge.config.distill import CacheConfig, DistillConfig
from lmforge.config.finetune import FinetuneConfig
from lmforge.config.model import ModelConfig
from lmforge.config.pretrain import EngineConfig, PretrainConfig
from lmforge.config.tokenize import TokenizeConfig
from pretrain import tokenize

from ..conftest import ROOT

BASE = """\
out_dir: out
sources:
  - type: stdlib
tokenizer:
  train:
    vocab_size: 1000
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, TokenizeConfig, overrides)
    return str(info.value)


def test_includes_merge_deeply_and_own_keys_win(tmp_path):
    write(tmp_path, "parts/tok.yaml", "train:\n  vocab_size: 2000\n  min_frequency: 5\n")
    write(tmp_path, "parts/data.yaml", "sources: [{type: files, paths: [a.txt]}]\nworkers: 3\n")
    main = write(tmp_path, "main.yaml", "include: parts/data.yaml\nout_dir: o\nworkers: 1\n"
                                        "tokenizer:\n  include: parts/tok.yaml\n  train: {vocab_size: 3000}\n")
    cfg = load_config(main, TokenizeConfig)
    assert cfg.workers == 1  # own key beats the included one
    assert cfg.tokenizer.train.vocab_size == 3000 and cfg.tokenizer.train.min_frequency == 5  # deep merge
    assert cfg.sources[0].paths == ["a.txt"]


def test_override_beats_file_and_is_validated(tmp_path):
    path = write(tmp_path, "c.yaml", BASE)
    cfg = load_config(path, TokenizeConfig, ["tokenizer.train.vocab_size=4096", "split.val_fraction=0.1"])
    assert cfg.tokenizer.train.vocab_size == 4096 and cfg.split.val_fraction == 0.1
    msg = error_of(path, ["tokenizer.train.vocab_size=big"])
    assert "command-line override 'tokenizer.train.vocab_size=big'" in msg
    assert "tokenizer.train.vocab_size" in msg and "'big'" in msg


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, "c.yaml", BASE + "    vocab_sise: 3\n")
    msg = error_of(path)
    assert f"{path}:7: tokenizer.train.vocab_sise: unknown key; did you mean 'vocab_size'?" in msg


def test_error_in_included_file_points_into_that_file(tmp_path):
    inc = write(tmp_path, "inc.yaml", "workers: many\n")
    path = write(tmp_path, "c.yaml", "include: inc.yaml\n" + BASE)
    msg = error_of(path)
    assert f"{inc}:1: workers:" in msg and "'many'" in msg


def test_override_of_unknown_key_is_an_error(tmp_path):
    path = write(tmp_path, "c.yaml", BASE)
    msg = error_of(path, ["tokenizer.trian.vocab_size=3"])
    assert "command-line override 'tokenizer.trian.vocab_size=3'" in msg and "did you mean 'train'" in msg


def test_override_into_a_value_is_an_error(tmp_path):
    path = write(tmp_path, "c.yaml", BASE)
    msg = error_of(path, ["out_dir.sub=1"])
    assert "'out_dir' is a value" in msg and f"{path}:1" in msg


def test_override_needs_key_and_value(tmp_path):
    path = write(tmp_path, "c.yaml", BASE)
    assert "expected KEY=VALUE" in error_of(path, ["workers"])


def test_override_indexes_lists(tmp_path):
    path = write(tmp_path, "c.yaml", BASE)
    cfg = load_config(path, TokenizeConfig, ["sources.0.exclude_tests=true"])
    assert cfg.sources[0].exclude_tests is True
    assert "has no item '3'" in error_of(path, ["sources.3=1"])


def test_include_cycle_and_missing_include(tmp_path):
    write(tmp_path, "a.yaml", "include: b.yaml\n")
    write(tmp_path, "b.yaml", "include: a.yaml\n")
    assert "include cycle" in error_of(tmp_path / "a.yaml")
    path = write(tmp_path, "c.yaml", "out_dir: x\ninclude: [nope.yaml]\n")
    assert f"{path}:2: included file not found: nope.yaml" in error_of(path)


def test_invalid_yaml_and_duplicate_keys(tmp_path):
    path = write(tmp_path, "bad.yaml", "out_dir: [unclosed\n")
    assert f"{path}:2" in error_of(path) and "invalid YAML" in error_of(path)
    dup = write(tmp_path, "dup.yaml", BASE + "out_dir: again\n")
    assert f"{dup}:7: duplicate key 'out_dir'" in error_of(dup)
    assert "config file not found" in error_of(tmp_path / "missing.yaml")
    assert "must be a mapping" in error_of(write(tmp_path, "list.yaml", "- a\n- b\n"))


def test_impossible_combinations(tmp_path):
    path = write(tmp_path, "c.yaml", BASE)
    assert "set exactly one of `tokenizer.train`" in error_of(path, ["tokenizer.pretrained=gpt2"])
    assert "not both" in error_of(path, ["split.val_docs=5", "split.val_fraction=0.2"])
    assert "missing" in error_of(write(tmp_path, "d.yaml", "sources: [{type: stdlib}]\n"))  # out_dir, tokenizer


def test_wrong_source_type_lists_the_choices(tmp_path):
    path = write(tmp_path, "c.yaml", BASE.replace("type: stdlib", "type: ftp"))
    msg = error_of(path)
    assert f"{path}:3" in msg and "stdlib" in msg and "files" in msg and "hf" in msg


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", BASE), TokenizeConfig, ["workers=1"])
    save_config(cfg, tmp_path / "saved" / "config.yaml")
    again = load_config(tmp_path / "saved" / "config.yaml", TokenizeConfig)
    assert again == cfg and again.output_digest() == cfg.output_digest()
    assert cfg.output_digest() == load_config(tmp_path / "c.yaml", TokenizeConfig, ["workers=2"]).output_digest()
    assert cfg.output_digest() != load_config(tmp_path / "c.yaml", TokenizeConfig,
                                              ["split.val_fraction=0.5"]).output_digest()


def test_help_lists_every_key_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as info:
        tokenize.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "tokenizer.train.vocab_size (int, default 8192): Vocabulary size, special tokens included." in out
    assert "sources[] with type=files" in out and "--dry-run" in out


def test_dry_run_prints_resolved_config_and_does_no_work(tmp_path, capsys):
    path = write(tmp_path, "c.yaml", BASE.replace("out_dir: out", f"out_dir: {tmp_path / 'out'}"))
    assert tokenize.main([str(path), "workers=7", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["workers"] == 7 and printed["tokenizer"]["train"]["vocab_size"] == 1000
    assert printed["split"]["val_fraction"] == 0.01  # defaults are shown resolved
    assert not (tmp_path / "out").exists()


def test_dry_run_goes_before_or_after_the_overrides(tmp_path, capsys):
    """`CONFIG --dry-run key=value` as well as `CONFIG key=value --dry-run` (argparse's plain parse refuses the first)."""
    path = write(tmp_path, "c.yaml", BASE.replace("out_dir: out", f"out_dir: {tmp_path / 'out'}"))
    assert tokenize.main([str(path), "--dry-run", "workers=5", "split.val_fraction=0.2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["workers"] == 5 and printed["split"]["val_fraction"] == 0.2


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    path = write(tmp_path, "c.yaml", BASE)
    with pytest.raises(SystemExit) as info:
        tokenize.main([str(path), "workers=-1"])
    assert info.value.code == 2
    assert "workers: Input should be greater than or equal to 0" in capsys.readouterr().err


# Every shipped config is loaded and validated. A new folder under configs/ must be mapped here.
SCHEMAS = {"tokenize": TokenizeConfig, "model": ModelConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig,
           "distill": DistillConfig}
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))
DEEPSPEED = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_config_is_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # shipped configs name files relative to the repository root, as the README runs them
    kind = path.relative_to(ROOT / "configs").parts[0]
    assert kind in SCHEMAS or kind == "pipelines", f"{path}: no schema registered for configs/{kind}/ in this test"
    if kind == "pipelines":  # the pipeline and every stage config in it, with its overrides
        from lmforge.pipeline import load

        assert load(path).steps
        return
    load_config(path, CacheConfig if kind == "distill" and path.stem.startswith("cache") else SCHEMAS[kind])


@pytest.mark.parametrize("path", DEEPSPEED, ids=[p.name for p in DEEPSPEED])
def test_shipped_deepspeed_json_holds_zero_settings_only(path):
    EngineConfig(deepspeed=path)
    assert set(json.loads(path.read_text())) == {"zero_optimization"}


def test_there_are_shipped_configs():
    folders = {p.parent.name for p in SHIPPED}
    assert {"tokenize", "model", "pretrain", "finetune", "distill", "pipelines"} <= folders
    assert {p.stem for p in DEEPSPEED} >= {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"}


def test_yaml_numbers_keep_their_text_in_string_fields(tmp_path):
    """YAML 1.1 reads `0123` as octal 83 and `1:30` as sexagesimal 90: a string field must keep what was written."""
    from lmforge.config.tokenize import TokenizeConfig

    main = write(tmp_path, "main.yaml", "out_dir: o\ntokenizer: {pretrained: x}\nshard_bytes: 4096\n"
                                        "sources: [{type: hf, name: ds, revision: 0123, config: 1:30, split: 1.10}]\n")
    cfg = load_config(main, TokenizeConfig)
    source = cfg.sources[0]
    assert (source.revision, source.config, source.split) == ("0123", "1:30", "1.10")
    assert cfg.shard_bytes == 4096 and type(cfg.shard_bytes) is int  # numbers stay numbers in number fields
    cfg = load_config(main, TokenizeConfig, ["sources.0.revision=0777", "shard_bytes=0x1000"])
    assert cfg.sources[0].revision == "0777" and cfg.shard_bytes == 4096
    assert "revision: '0777'" in to_yaml(cfg)  # and the saved config reads back the same


def test_an_include_can_be_switched_from_the_command_line(tmp_path, monkeypatch):
    from lmforge.config.pretrain import PretrainConfig

    monkeypatch.chdir(ROOT)
    path = ROOT / "configs" / "pretrain" / "demo.yaml"
    base = load_config(path, PretrainConfig)
    big = load_config(path, PretrainConfig, ["model.include=configs/model/124m.yaml"])
    assert (base.model.hidden_size, big.model.hidden_size) == (load_config(path, PretrainConfig).model.hidden_size,
                                                              768)
    assert big.model.num_layers == 12 and big.optim == base.optim  # only the model section changed
    with pytest.raises(ConfigError, match=r"included file not found: configs/model/nope\.yaml"):
        load_config(path, PretrainConfig, ["model.include=configs/model/nope.yaml"])


def test_the_default_deepspeed_json_is_found_from_any_working_directory(tmp_path, monkeypatch):
    from lmforge import engine
    from lmforge.config.pretrain import located

    monkeypatch.chdir(tmp_path)  # no configs/ here
    cfg = load_config(ROOT / "configs" / "pretrain" / "demo.yaml", PretrainConfig)
    assert cfg.engine.deepspeed == Path("configs/deepspeed/zero2.json")  # recorded as given: the digest is portable
    assert engine.read_zero_json(cfg.engine.deepspeed)["zero_optimization"]["stage"] == 2
    (tmp_path / "configs" / "deepspeed").mkdir(parents=True)
    (tmp_path / "configs" / "deepspeed" / "zero2.json").write_text('{"zero_optimization": {"stage": 1}}')
    assert located(Path("configs/deepspeed/zero2.json")) == Path("configs/deepspeed/zero2.json")  # the user's own wins
    with pytest.raises(ConfigError, match="DeepSpeed config not found: nope.json \\(looked in the working directory"):
        load_config(ROOT / "configs" / "pretrain" / "demo.yaml", PretrainConfig, ["engine.deepspeed=nope.json"])


def test_the_pad_token_is_named_and_must_be_special(tmp_path):
    from lmforge.config.tokenize import TrainTokenizer

    assert TrainTokenizer().pad_token == "<|pad|>"
    # configs written before pad_token existed keep their pad token: the second special token, or none
    assert TrainTokenizer(special_tokens=["<eos>", "<pad>"]).pad_token == "<pad>"
    assert TrainTokenizer(special_tokens=["<eos>"]).pad_token is None
    with pytest.raises(ValueError, match=r"pad_token '<pad>' is not one of special_tokens \['<eos>'\]"):
        TrainTokenizer(special_tokens=["<eos>"], pad_token="<pad>")
    with pytest.raises(ValueError, match="pad_token is the EOS token"):
        TrainTokenizer(special_tokens=["<eos>"], pad_token="<eos>")
    assert TrainTokenizer(special_tokens=["<eos>"], pad_token=None).pad_token is None


def test_a_field_added_at_its_default_keeps_the_digest():
    """A newer lmforge with one more field (at a default that keeps the old behaviour) must not see every output
    of the older one as "a different config"."""
    from pydantic import create_model

    from lmforge.config.base import StrictModel

    old = create_model("Section", __base__=StrictModel, lr=(float, 1e-3), steps=(int, 10))
    new = create_model("Section", __base__=StrictModel, lr=(float, 1e-3), steps=(int, 10), clip=(float, 1.0))
    assert old(lr=3e-4).digest() == new(lr=3e-4).digest()
    assert old(lr=3e-4).digest() != new(lr=3e-4, clip=0.5).digest() != old(lr=1e-4).digest()
    assert old().digest() == old(steps=10).digest()  # spelled out or not: the same config


def test_an_include_switched_from_the_command_line_wins_inside_included_files_too(tmp_path, monkeypatch):
    from lmforge.config.pretrain import PretrainConfig

    monkeypatch.chdir(ROOT)
    base = tmp_path / "base.yaml"
    base.write_text((ROOT / "configs" / "pretrain" / "demo.yaml").read_text().replace(
        "../model/", str(ROOT / "configs" / "model") + "/").replace("../deepspeed/", str(ROOT / "configs" / "deepspeed") + "/"))
    top = tmp_path / "top.yaml"
    top.write_text("include: base.yaml\ntrain: {max_steps: 3}\n")  # the model section lives in the included file
    cfg = load_config(top, PretrainConfig, ["model.include=configs/model/124m.yaml"])
    assert cfg.model.hidden_size == 768 and cfg.train.max_steps == 3
    assert load_config(top, PretrainConfig).model.hidden_size != 768
