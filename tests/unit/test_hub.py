"""Model card and `lmforge push`: what the card says, what goes up, and that no token ever leaks.

Every Hub call goes to a fake HfApi that records it: nothing here touches the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError

from lmforge import cli, hub
from tests.conftest import ROOT

FAKE_TOKEN = "hf_" + "Zq9" * 12  # shaped like a real token (hf_ + 36 alphanumerics)
OTHER_TOKEN = "hf_" + "a1B2c3D4e5" * 4
WANDB_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 hex characters, like a W&B key


class FakeApi:
    """Stands in for HfApi: records (method, args, kwargs) of every call; `fail` makes one method raise."""

    def __init__(self, fail: dict[str, Exception] | None = None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail = fail or {}

    def _record(self, name, args, kwargs):
        self.calls.append((name, args, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", args, kwargs)

    def create_branch(self, *args, **kwargs):
        self._record("create_branch", args, kwargs)

    def upload_folder(self, *args, **kwargs):
        self._record("upload_folder", args, kwargs)

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


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
    api = FakeApi()
    uploaded = hub.push(hf_folder, "my-org/tiny-llama", revision="step-1000", private=True, api=api)
    assert uploaded == EXPECTED
    assert api.names() == ["create_repo", "create_branch", "upload_folder"]
    (_, repo_args, repo_kw), (_, branch_args, branch_kw), (_, _, up) = api.calls
    assert repo_args == ("my-org/tiny-llama",) and repo_kw["private"] is True and repo_kw["exist_ok"] is True
    assert branch_args == ("my-org/tiny-llama",) and branch_kw["branch"] == "step-1000" and branch_kw["exist_ok"]
    assert up["repo_id"] == "my-org/tiny-llama" and up["revision"] == "step-1000"
    assert Path(up["folder_path"]) == hf_folder

    # What upload_folder would send, filtered by huggingface_hub's own matcher over the whole tree.
    from huggingface_hub.utils import filter_repo_objects

    every_file = sorted(p.relative_to(hf_folder).as_posix() for p in hf_folder.rglob("*") if p.is_file())
    sent = list(filter_repo_objects(every_file, allow_patterns=up["allow_patterns"],
                                    ignore_patterns=up["ignore_patterns"]))
    assert sent == EXPECTED
    assert "training_state.pt" in every_file and "checkpoints/config.json" in every_file
    assert not any(s.startswith("checkpoints/") or s.endswith((".pt", ".bin", ".tmp")) for s in sent)


def test_push_without_revision_goes_to_main_and_creates_no_branch(hf_folder, token):
    api = FakeApi()
    assert hub.push(hf_folder, "my-org/tiny-llama", api=api) == EXPECTED
    assert api.names() == ["create_repo", "upload_folder"]
    assert api.calls[-1][2]["revision"] is None  # huggingface_hub's default: main
    assert api.calls[0][2]["private"] is False


def test_dry_run_makes_no_call_and_needs_no_token(hf_folder, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    api = FakeApi()
    assert hub.push(hf_folder, "my-org/tiny-llama", revision="step-5", dry_run=True, api=api) == EXPECTED
    assert api.calls == []


@pytest.mark.parametrize("remove, missing", [("config.json", "has no config.json;"),
                                             ("model.safetensors", "has no \\*.safetensors weights;")])
def test_a_folder_without_config_or_weights_is_refused(hf_folder, token, remove, missing):
    (hf_folder / remove).unlink()
    api = FakeApi()
    with pytest.raises(hub.HubError, match=missing) as e:
        hub.push(hf_folder, "my-org/tiny-llama", api=api)
    assert str(hf_folder) in str(e.value) and api.calls == []
    # the pickles it does hold are named, with why they do not count
    assert "it holds optimizer.bin, training_state.pt, zero_to_fp32.py, which lmforge never uploads" in str(e.value)


def test_a_run_directory_gets_the_hint_to_push_final(tmp_path, token):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(hub.HubError, match=r"looks like a run directory; push RUN_DIR/final"):
        hub.push(run, "my-org/tiny-llama", api=FakeApi())
    (tmp_path / "empty").mkdir()
    with pytest.raises(hub.HubError, match=r"no config.json and no \*.safetensors weights; run `lmforge export"):
        hub.push(tmp_path / "empty", "my-org/tiny-llama", api=FakeApi())
    with pytest.raises(hub.HubError, match="no such folder"):
        hub.push(tmp_path / "nowhere", "my-org/tiny-llama", api=FakeApi())


def test_sharded_weights_must_all_be_present(hf_folder, token):
    (hf_folder / "model.safetensors").unlink()
    (hf_folder / "model-00001-of-00002.safetensors").write_text("x")
    (hf_folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(hub.HubError, match="model-00002-of-00002.safetensors"):
        hub.push(hf_folder, "my-org/tiny-llama", api=FakeApi())
    (hf_folder / "model-00002-of-00002.safetensors").write_text("x")
    assert "model-00002-of-00002.safetensors" in hub.push(hf_folder, "my-org/tiny-llama", api=FakeApi())


def test_no_token_is_an_error_with_the_hint(hf_folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    api = FakeApi()
    with pytest.raises(hub.HubError, match=r"set HF_TOKEN .* or run `hf auth login`"):
        hub.push(hf_folder, "my-org/tiny-llama", api=api)
    assert api.calls == []


def test_the_real_get_token_reads_hf_token(hf_folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    api = FakeApi()
    assert hub.push(hf_folder, "my-org/tiny-llama", api=api) == EXPECTED  # no "no token" error
    assert api.names() == ["create_repo", "upload_folder"]


def test_a_refused_upload_never_shows_the_token(hf_folder, token):
    # The worst case: the token is in the request headers and echoed in the error text itself.
    response = SimpleNamespace(status_code=403, request=None,
                               headers={"authorization": f"Bearer {token}", "x-request-id": "req-1"})
    error = HfHubHTTPError(f"403 Forbidden for url https://huggingface.co/api/x (Bearer {token})",
                           response=response)
    api = FakeApi(fail={"upload_folder": error})
    with pytest.raises(hub.HubError) as e:
        hub.push(hf_folder, "my-org/tiny-llama", revision="step-1000", api=api)
    message = str(e.value)
    assert token not in message and "Bearer ***" in message
    assert "uploading" in message and "HTTP 403" in message and "write access to it" in message
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained error carrying headers
    assert api.names() == ["create_repo", "create_branch", "upload_folder"]


def test_an_unreachable_hub_is_a_clear_error(hf_folder, token):
    api = FakeApi(fail={"create_repo": ConnectionError("offline mode is enabled")})
    with pytest.raises(hub.HubError, match="creating the repo for my-org/tiny-llama failed.*cannot reach the Hub"):
        hub.push(hf_folder, "my-org/tiny-llama", api=api)
    assert api.names() == ["create_repo"]


@pytest.mark.parametrize("repo_id", ["tiny-llama", "a/b/c", "my-org/bad..name", "my org/x", ""])
def test_an_invalid_repo_id_is_refused_before_any_call(hf_folder, token, repo_id):
    api = FakeApi()
    with pytest.raises(hub.HubError, match="invalid repo id"):
        hub.push(hf_folder, repo_id, api=api)
    assert api.calls == []


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
    api = FakeApi()
    real_push = hub.push
    monkeypatch.setattr(hub, "push", lambda *a, **kw: real_push(*a, **kw, api=api))
    assert cli.main(["push", str(hf_folder), "--repo-id", "my-org/tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("uploaded 6 files, 2.1 kB to https://huggingface.co/my-org/tiny-llama/tree/main")
    assert api.names() == ["create_repo", "upload_folder"]

    (hf_folder / "config.json").unlink()
    assert cli.main(["push", str(hf_folder), "--repo-id", "my-org/tiny-llama"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lmforge push: error: ") and "has no config.json" in err and token not in err

    with pytest.raises(SystemExit) as e:  # usage errors are argparse's: exit 2
        cli.main(["push", str(hf_folder), "--repo-id", "not-an-org-slash-name"])
    assert e.value.code == 2 and "invalid repo id" in capsys.readouterr().err
