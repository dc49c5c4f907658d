"""Model card and `lmforge push`: what the card says, what goes up, and that no token ever leaks.

Every Hub call goes to an autospec of the installed `HfApi` that records it: nothing here touches the
network, and a call with an argument the installed huggingface_hub does not take fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import create_autospec

import pytest
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

from lmforge import cli, hub
from tests.conftest import ROOT

FAKE_TOKEN = "hf_" + "Zq9" * 12  # shaped like a real token (hf_ + 36 alphanumerics)
OTHER_TOKEN = "hf_" + "a1B2c3D4e5" * 4
WANDB_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 hex characters, like a W&B key


def hub_api(fail: dict[str, Exception] | None = None):
    """An autospec of HfApi: records every call in `method_calls`, checks each call's arguments against
    the installed signature (a renamed or wrong keyword raises TypeError), and `fail` makes a method raise."""
    api = create_autospec(HfApi, instance=True, spec_set=True)
    for name, error in (fail or {}).items():
        getattr(api, name).side_effect = error
    return api


def names(api) -> list[str]:
    return [name for name, _, _ in api.method_calls]


def full_info(**extra) -> dict:
    info = dict(stage="pretrain", task="text-generation", architecture="LlamaForCausalLM", family="llama",
                num_params=12_345_678, num_layers=6, hidden_size=384, num_heads=6, vocab_size=8192,
                context_length=1024, tokens_seen=1_234_567_890, steps=1000, global_batch_tokens=524_288,
                world_size=8, device="NVIDIA H100 80GB", data_fingerprint="fp-7c1e", tokenizer_hash="tok-93ab",
                metrics={"val_loss": 3.21456, "val_perplexity": 24.8912},
                command="torchrun --nproc_per_node=8 -m pretrain configs/pretrain/demo.yaml optim.lr=3e-4",
                config_yaml="model:\n  num_layers: 6\noptim:\n  lr: 0.0003\n", parent=None, license="apache-2.0")
    info.update(extra)
    return info


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    """An exported HF folder, plus what must never go up: a pickle, a ZeRO leftover, a checkpoints/ tree."""
    folder = tmp_path / "final"
    folder.mkdir()
    for name, data in {"config.json": "{}", "model.safetensors": "x" * 2048, "tokenizer.json": "{}",
                       "generation_config.json": "{}", "README.md": "---\ntags: [lmforge]\n---\n",
                       "lineage.json": "{}", "training_state.pt": "pickle", "optimizer.bin": "pickle",
                       "zero_to_fp32.py": "#", ".README.md.abc.tmp": "half"}.items():
        (folder / name).write_text(data)
    (folder / "checkpoints" / "global_step10").mkdir(parents=True)
    (folder / "checkpoints" / "global_step10" / "mp_rank_00_model_states.pt").write_text("pickle")
    (folder / "checkpoints" / "config.json").write_text("{}")  # same name as a top-level file: still not uploaded
    return folder


EXPECTED = ["README.md", "config.json", "generation_config.json", "lineage.json", "model.safetensors",
            "tokenizer.json"]


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(hub, "get_token", lambda: os.environ.get("HF_TOKEN"))
    return FAKE_TOKEN


# --------------------------------------------------------------------------------------------------
# Model card


def test_model_card_has_front_matter_architecture_training_results_and_reproduction(tmp_path):
    hub.write_model_card(tmp_path, full_info(parent="openai-community/gpt2"))
    text = (tmp_path / "README.md").read_text()
    meta = front_matter(text)
    assert meta == {"library_name": "transformers", "tags": ["lmforge", "pretrain"], "license": "apache-2.0",
                    "pipeline_tag": "text-generation", "base_model": "openai-community/gpt2"}
    assert ModelCard.load(tmp_path / "README.md").data.tags == ["lmforge", "pretrain"]  # the Hub's own parser
    assert "| Parameters | 12.3M (12,345,678) |" in text
    assert "| Layers | 6 |" in text and "| Attention heads | 6 |" in text and "| Hidden size | 384 |" in text
    assert "| Context length | 1,024 tokens |" in text and "| Vocabulary | 8,192 tokens |" in text
    assert "| Tokens seen | 1.2B (1,234,567,890) |" in text and "| Global batch | 524,288 tokens |" in text
    assert "| Hardware | 8 × NVIDIA H100 80GB |" in text
    assert "`fp-7c1e`" in text and "`tok-93ab`" in text
    assert "| Metric | Value |" in text and "| val_loss | 3.215 |" in text and "| val_perplexity | 24.89 |" in text
    assert "AutoModelForCausalLM.from_pretrained(model_id)" in text and "AutoTokenizer" in text
    assert "```bash\ntorchrun --nproc_per_node=8 -m pretrain configs/pretrain/demo.yaml optim.lr=3e-4\n```" in text
    assert "```yaml\nmodel:\n  num_layers: 6\noptim:\n  lr: 0.0003\n```" in text
    assert "lineage.json" in text
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left beside it


def test_minimal_info_omits_what_is_absent_and_classification_uses_its_class(tmp_path):
    hub.write_model_card(tmp_path, {"stage": "finetune", "architecture": "GPT2ForSequenceClassification",
                                    "num_params": 950_000, "task": "text-classification", "parent": "runs/x/final"})
    text = (tmp_path / "README.md").read_text()
    meta = front_matter(text)
    assert meta["pipeline_tag"] == "text-classification" and meta["tags"] == ["lmforge", "finetune"]
    assert "license" not in meta and "base_model" not in meta  # a local parent path is no Hub base model
    assert "950.0K" in text and "AutoModelForSequenceClassification.from_pretrained" in text
    for absent in ("## Results", "## Reproduce", "## Data", "| Layers", "None"):
        assert absent not in text
    assert "`runs/x/final`" in text  # the lineage section still names the parent


def test_model_card_errors_name_the_missing_key_or_bad_task(tmp_path):
    with pytest.raises(ValueError, match="num_params"):
        hub.write_model_card(tmp_path, {"stage": "pretrain", "architecture": "LlamaForCausalLM"})
    with pytest.raises(ValueError, match="task 'summarize'"):
        hub.write_model_card(tmp_path, full_info(task="summarize"))
    assert not (tmp_path / "README.md").exists()


def test_no_secret_reaches_the_model_card(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "legacy-secret-value")
    info = full_info(
        command=f"HF_TOKEN={FAKE_TOKEN} torchrun -m pretrain c.yaml --hub-token {OTHER_TOKEN} tag=legacy-secret-value",
        config_yaml=f"wandb:\n  key: {WANDB_KEY}\nwandb_api_key: 'not-from-env-123'\nnote: {OTHER_TOKEN}\n",
        name=f"model {FAKE_TOKEN}")
    hub.write_model_card(tmp_path, info)
    text = (tmp_path / "README.md").read_text()
    for secret in (FAKE_TOKEN, OTHER_TOKEN, WANDB_KEY, "legacy-secret-value", "not-from-env-123"):
        assert secret not in text
    assert "HF_TOKEN=*** torchrun -m pretrain c.yaml --hub-token ***" in text
    assert "wandb_api_key: ***" in text and "  key: ***" in text
    assert front_matter(text)["tags"] == ["lmforge", "pretrain"]  # scrubbing left the card parseable


def test_human_counts():
    assert [hub.human(n) for n in (12_345_678, 7_000_000_000, 950_000, 512, 2.5e12)] == \
        ["12.3M", "7.0B", "950.0K", "512", "2.5T"]


# --------------------------------------------------------------------------------------------------
# Push


def test_push_to_a_revision_creates_repo_then_branch_then_uploads_only_the_hf_files(hf_folder, token):
    api = hub_api()
    uploaded = hub.push(hf_folder, "my-org/tiny-llama", revision="step-1000", private=True, api=api)
    assert uploaded == EXPECTED
    assert names(api) == ["create_repo", "create_branch", "upload_folder", "create_commit"]
    (_, repo_args, repo_kw), (_, branch_args, branch_kw), (_, _, up), (_, commit_args, commit) = api.method_calls
    assert repo_args == ("my-org/tiny-llama",) and repo_kw["private"] is True and repo_kw["exist_ok"] is True
    assert branch_args == ("my-org/tiny-llama",) and branch_kw["branch"] == "step-1000" and branch_kw["exist_ok"]
    assert up["repo_id"] == "my-org/tiny-llama" and up["revision"] == "step-1000"
    assert Path(up["folder_path"]) == hf_folder
    # the card and lineage go up last, in one commit, from their rewritten text
    assert commit_args == ("my-org/tiny-llama",) and commit["revision"] == "step-1000"
    added = {op.path_in_repo: op.path_or_fileobj for op in commit["operations"]}
    assert all(isinstance(op, CommitOperationAdd) for op in commit["operations"])
    assert added == {"README.md": b"---\ntags: [lmforge]\n---\n", "lineage.json": b"{}\n"}

    # What upload_folder would send, filtered by huggingface_hub's own matcher over the whole tree.
    from huggingface_hub.utils import filter_repo_objects

    every_file = sorted(p.relative_to(hf_folder).as_posix() for p in hf_folder.rglob("*") if p.is_file())
    sent = list(filter_repo_objects(every_file, allow_patterns=up["allow_patterns"],
                                    ignore_patterns=up["ignore_patterns"]))
    assert sorted(sent + list(added)) == EXPECTED and not set(sent) & set(added)
    assert "training_state.pt" in every_file and "checkpoints/config.json" in every_file
    assert not any(s.startswith("checkpoints/") or s.endswith((".pt", ".bin", ".tmp")) for s in sent)


def test_push_without_revision_goes_to_main_and_creates_no_branch(hf_folder, token):
    api = hub_api()
    assert hub.push(hf_folder, "my-org/tiny-llama", api=api) == EXPECTED
    assert names(api) == ["create_repo", "upload_folder", "create_commit"]
    assert api.method_calls[1][2]["revision"] is None  # huggingface_hub's default: main
    assert api.method_calls[2][2]["revision"] is None
    assert api.method_calls[0][2]["private"] is False


def test_dry_run_makes_no_call_and_needs_no_token(hf_folder, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    api = hub_api()
    assert hub.push(hf_folder, "my-org/tiny-llama", revision="step-5", dry_run=True, api=api) == EXPECTED
    assert api.method_calls == []


@pytest.mark.parametrize("remove, missing", [("config.json", "has no config.json;"),
                                             ("model.safetensors", "has no \\*.safetensors weights;")])
def test_a_folder_without_config_or_weights_is_refused(hf_folder, token, remove, missing):
    (hf_folder / remove).unlink()
    api = hub_api()
    with pytest.raises(hub.HubError, match=missing) as e:
        hub.push(hf_folder, "my-org/tiny-llama", api=api)
    assert str(hf_folder) in str(e.value) and api.method_calls == []
    # the pickles it does hold are named, with why they do not count
    assert "it holds optimizer.bin, training_state.pt, zero_to_fp32.py, which lmforge never uploads" in str(e.value)


def test_a_run_directory_gets_the_hint_to_push_final(tmp_path, token):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(hub.HubError, match=r"looks like a run directory; push RUN_DIR/final"):
        hub.push(run, "my-org/tiny-llama", api=hub_api())
    (tmp_path / "empty").mkdir()
    with pytest.raises(hub.HubError, match=r"no config.json and no \*.safetensors weights; run `lmforge export"):
        hub.push(tmp_path / "empty", "my-org/tiny-llama", api=hub_api())
    with pytest.raises(hub.HubError, match="no such folder"):
        hub.push(tmp_path / "nowhere", "my-org/tiny-llama", api=hub_api())


def test_sharded_weights_must_all_be_present(hf_folder, token):
    (hf_folder / "model.safetensors").unlink()
    (hf_folder / "model-00001-of-00002.safetensors").write_text("x")
    (hf_folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(hub.HubError, match="model-00002-of-00002.safetensors"):
        hub.push(hf_folder, "my-org/tiny-llama", api=hub_api())
    (hf_folder / "model-00002-of-00002.safetensors").write_text("x")
    assert "model-00002-of-00002.safetensors" in hub.push(hf_folder, "my-org/tiny-llama", api=hub_api())


def test_no_token_is_an_error_with_the_hint(hf_folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    api = hub_api()
    with pytest.raises(hub.HubError, match=r"set HF_TOKEN .* or run `hf auth login`"):
        hub.push(hf_folder, "my-org/tiny-llama", api=api)
    assert api.method_calls == []


def test_the_real_get_token_reads_hf_token(hf_folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    api = hub_api()
    assert hub.push(hf_folder, "my-org/tiny-llama", api=api) == EXPECTED  # no "no token" error
    assert names(api) == ["create_repo", "upload_folder", "create_commit"]


def test_a_refused_upload_never_shows_the_token(hf_folder, token):
    # The worst case: the token is in the request headers and echoed in the error text itself.
    response = SimpleNamespace(status_code=403, request=None,
                               headers={"authorization": f"Bearer {token}", "x-request-id": "req-1"})
    error = HfHubHTTPError(f"403 Forbidden for url https://huggingface.co/api/x (Bearer {token})",
                           response=response)
    api = hub_api(fail={"upload_folder": error})
    with pytest.raises(hub.HubError) as e:
        hub.push(hf_folder, "my-org/tiny-llama", revision="step-1000", api=api)
    message = str(e.value)
    assert token not in message and "Bearer ***" in message
    assert "uploading" in message and "HTTP 403" in message and "write access to it" in message
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained error carrying headers
    assert names(api) == ["create_repo", "create_branch", "upload_folder"]


def test_an_unreachable_hub_is_a_clear_error(hf_folder, token):
    api = hub_api(fail={"create_repo": ConnectionError("offline mode is enabled")})
    with pytest.raises(hub.HubError, match="creating the repo for my-org/tiny-llama failed.*cannot reach the Hub"):
        hub.push(hf_folder, "my-org/tiny-llama", api=api)
    assert names(api) == ["create_repo"]


@pytest.mark.parametrize("repo_id", ["tiny-llama", "a/b/c", "my-org/bad..name", "my org/x", ""])
def test_an_invalid_repo_id_is_refused_before_any_call(hf_folder, token, repo_id):
    api = hub_api()
    with pytest.raises(hub.HubError, match="invalid repo id"):
        hub.push(hf_folder, repo_id, api=api)
    assert api.method_calls == []


def test_the_mock_api_rejects_what_the_installed_huggingface_hub_rejects():
    api = hub_api()
    with pytest.raises(TypeError, match="folder"):
        api.upload_folder(repo_id="my-org/x", folder="final")  # the keyword is folder_path
    with pytest.raises(TypeError):
        api.create_branch("my-org/x", "step-5")  # branch is keyword-only
    assert not hasattr(api, "upload_directory")  # no such method


# --------------------------------------------------------------------------------------------------
# No absolute local path reaches the Hub


def test_scrub_paths_shortens_absolute_paths_only():
    home = os.path.expanduser("~")
    text = (f"torchrun -m pretrain /srv/ann/configs/demo.yaml data.path=/scratch/ann/tok init_from={home}/runs/x/final"
            " | see https://huggingface.co/org/m, runs/a/final, ./b/c, ~/d/e, 8/16 GPUs, tokens/s `/mnt/f/g/h`")
    assert hub.scrub_paths(text) == (
        "torchrun -m pretrain .../configs/demo.yaml data.path=.../ann/tok init_from=.../x/final"
        " | see https://huggingface.co/org/m, runs/a/final, ./b/c, ~/d/e, 8/16 GPUs, tokens/s `.../g/h`")
    assert hub.short_path(home) == "..." and hub.short_path(f"{home}/run") == ".../run"


def test_model_card_publishes_no_absolute_path(tmp_path):
    run = tmp_path / "runs" / "demo"
    info = full_info(parent=str(run / "base" / "final"),
                     command=f"torchrun -m pretrain {run}/config.yaml data.path={tmp_path}/data/tok",
                     config_yaml=f"data:\n  path: {tmp_path}/data/tok\ninit_from: {run}/base/final\n")
    text = hub.model_card(info)
    assert str(tmp_path) not in text
    assert "The parent checkpoint is `.../base/final`." in text
    assert "torchrun -m pretrain .../demo/config.yaml data.path=.../data/tok" in text
    assert "  path: .../data/tok\ninit_from: .../base/final" in text
    assert hub.model_card(full_info(parent="runs/x/final")).count("`runs/x/final`") == 1  # relative: as given


def test_push_uploads_no_absolute_path_from_lineage_or_card(hf_folder, token, tmp_path):
    prefix = str(tmp_path)  # where the run lives: must not go up
    run = tmp_path / "runs" / "demo"
    lineage = {"stage": "pretrain", "run_dir": str(run), "checkpoint": f"{run}/checkpoints/step-00000100",
               "parent": f"{tmp_path}/my runs/base/final",  # a space inside: still one path
               "data": {"path": f"{tmp_path}/data/tok", "fingerprint": "fp-1"}, "step": 100,
               "exported_from": "checkpoints/step-00000100",  # relative to the run: kept as is
               "upstream": [{"stage": "tokenize", "sources": [f"{tmp_path}/raw/a.jsonl", "hf://org/ds"],
                             "command": f"python -m pretrain.tokenize {tmp_path}/cfg.yaml"}]}
    (hf_folder / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
    card = f"---\ntags: [lmforge]\n---\n# demo\nparent `{run}/base/final`\n\n```bash\npython -m pretrain {run}/c.yaml\n```\n"
    (hf_folder / "README.md").write_text(card)  # as an older lmforge rendered it: raw paths
    (hf_folder / "tokenizer.json").write_text('{"model": {"vocab": {"/usr": 7, "/home": 8}}}')
    before = {p.name: p.read_bytes() for p in hf_folder.iterdir() if p.is_file()}

    api = hub_api()
    assert hub.push(hf_folder, "my-org/tiny-llama", api=api) == EXPECTED
    (_, _, up), (_, _, commit) = api.method_calls[1:]
    from huggingface_hub.utils import filter_repo_objects

    from_disk = filter_repo_objects(sorted(p.name for p in hf_folder.iterdir() if p.is_file()),
                                    allow_patterns=up["allow_patterns"], ignore_patterns=up["ignore_patterns"])
    uploaded = {name: (hf_folder / name).read_bytes() for name in from_disk}
    uploaded.update({op.path_in_repo: op.path_or_fileobj for op in commit["operations"]})
    assert sorted(uploaded) == EXPECTED
    for name, data in uploaded.items():
        assert prefix.encode() not in data, name

    sent = json.loads(uploaded["lineage.json"])
    assert sent == {**lineage, "run_dir": ".../runs/demo", "checkpoint": ".../checkpoints/step-00000100",
                    "parent": ".../base/final", "data": {"path": ".../data/tok", "fingerprint": "fp-1"},
                    "upstream": [{"stage": "tokenize", "sources": [".../raw/a.jsonl", "hf://org/ds"],
                                  "command": f"python -m pretrain.tokenize .../{tmp_path.name}/cfg.yaml"}]}
    assert b"parent `.../base/final`" in uploaded["README.md"] and b"pretrain .../demo/c.yaml" in uploaded["README.md"]
    assert uploaded["tokenizer.json"] == before["tokenizer.json"]  # a vocabulary's "/usr" is no path: unchanged
    assert {p.name: p.read_bytes() for p in hf_folder.iterdir() if p.is_file()} == before  # disk keeps full paths


def test_an_unreadable_card_is_refused_before_any_call(hf_folder, token):
    (hf_folder / "README.md").write_bytes(b"\xff\xfe not utf-8")
    api = hub_api()
    with pytest.raises(hub.HubError, match="README.md: not UTF-8 text.*re-run `lmforge export`"):
        hub.push(hf_folder, "my-org/tiny-llama", api=api)
    assert api.method_calls == []


# --------------------------------------------------------------------------------------------------
# Command line


def test_push_help_through_the_console_entry():
    out = subprocess.run([sys.executable, "-m", "lmforge.cli", "push", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("HF_DIR", "--repo-id ORG/NAME", "--revision BRANCH", "--private", "--dry-run"):
        assert flag in out.stdout


def test_cli_dry_run_lists_files_with_sizes_and_the_url(hf_folder, monkeypatch, capsys):
    monkeypatch.setattr(hub, "get_token", lambda: None)  # a dry run needs no token
    assert cli.main(["push", str(hf_folder), "--repo-id", "my-org/tiny-llama", "--revision", "step-1000",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [line.split()[-1] for line in lines[:-1]] == EXPECTED
    assert "2.0 kB  model.safetensors" in out
    assert lines[-1].startswith("dry run: would upload 6 files")
    assert lines[-1].endswith("https://huggingface.co/my-org/tiny-llama/tree/step-1000")
    assert "training_state.pt" not in out and "checkpoints" not in out


def test_cli_push_prints_files_and_url_and_exit_codes(hf_folder, token, monkeypatch, capsys):
    api = hub_api()
    real_push = hub.push
    monkeypatch.setattr(hub, "push", lambda *a, **kw: real_push(*a, **kw, api=api))
    assert cli.main(["push", str(hf_folder), "--repo-id", "my-org/tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("uploaded 6 files, 2.1 kB to https://huggingface.co/my-org/tiny-llama/tree/main")
    assert names(api) == ["create_repo", "upload_folder", "create_commit"]

    (hf_folder / "config.json").unlink()
    assert cli.main(["push", str(hf_folder), "--repo-id", "my-org/tiny-llama"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lmforge push: error: ") and "has no config.json" in err and token not in err

    with pytest.raises(SystemExit) as e:  # usage errors are argparse's: exit 2
        cli.main(["push", str(hf_folder), "--repo-id", "not-an-org-slash-name"])
    assert e.value.code == 2 and "invalid repo id" in capsys.readouterr().err


def test_a_lora_adapter_folder_pushes_with_its_base_path_shortened(tmp_path, token):
    """A LoRA run's final/adapter/ (peft's format: adapter_config.json + adapter_model.safetensors, no
    config.json) is pushable; its base model's local path does not go up."""
    adapter = tmp_path / "run" / "final" / "adapter"
    adapter.mkdir(parents=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": f"{tmp_path}/runs/pretrain/final", "r": 4,
              "target_modules": ["q_proj", "v_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (adapter / "adapter_model.safetensors").write_text("x" * 512)
    (adapter / "README.md").write_text(f"---\nbase_model: {tmp_path}/runs/pretrain/final\n---\n")
    api = hub_api()
    assert hub.push(adapter, "my-org/tiny-lora", api=api) == ["README.md", "adapter_config.json",
                                                              "adapter_model.safetensors"]
    (_, _, up), (_, _, commit) = api.method_calls[1:]
    assert up["allow_patterns"] == ["adapter_model.safetensors"]
    sent = {op.path_in_repo: op.path_or_fileobj for op in commit["operations"]}
    assert json.loads(sent["adapter_config.json"]) == {**config, "base_model_name_or_path": ".../pretrain/final"}
    assert list(json.loads(sent["adapter_config.json"])) == list(config)  # peft's key order kept
    assert str(tmp_path).encode() not in sent["README.md"]
    (adapter / "adapter_model.safetensors").unlink()  # half an adapter is no model folder
    with pytest.raises(hub.HubError, match="not a Hugging Face model folder"):
        hub.push(adapter, "my-org/tiny-lora", api=hub_api())
