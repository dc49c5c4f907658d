"""The Hub: a model card for an exported folder, and `lmforge push` to upload that folder.

Only the Hugging Face folder's own top-level files go up (config, safetensors, tokenizer, card,
lineage): never PyTorch pickles, DeepSpeed shards or anything in a subfolder, so pointing `push` at
the wrong folder cannot publish optimizer state. A step-named revision (`--revision step-1000`) is a
branch of the repo, created when missing, so a run's intermediate exports sit beside `main`.

Secrets never reach the Hub or the terminal: the card is scrubbed of tokens before it is written, and
the token itself is never printed, not even inside an error.

No absolute local path reaches the Hub either (it names users, home folders and cluster layout): the
card renders an absolute path as its last two components (`/home/ann/runs/demo/final` becomes
`.../demo/final`), and `push` uploads README.md and lineage.json rewritten the same way; the files on
disk keep their full paths. Paths relative to the run folder pass through unchanged.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import sys
from pathlib import Path
from urllib.parse import quote

from huggingface_hub import CommitOperationAdd, ModelCardData, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from lmforge import atomic


class HubError(Exception):
    """A folder that cannot be pushed, or a push the Hub refused."""


# --------------------------------------------------------------------------------------------------
# Secrets

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
# An HF access token; `NAME=value` / `name: value` for the variables above, in a command or YAML.
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{30,}")
_ASSIGNMENT_RE = re.compile(r"\b(" + "|".join(SECRET_ENV_VARS) + r")(\s*[=:]\s*)(['\"]?)[^\s'\"]+\3",
                            re.IGNORECASE)


# An absolute POSIX path: a `/` that starts a token (not one inside a URL, a relative path or `a/b`),
# then path components up to a space, a quote or markdown/YAML punctuation.
_ABS_PATH_RE = re.compile(r"(?<![\w.~/:\\-])/[^\s/'\"`<>|;,()\[\]{}]+(?:/[^\s/'\"`<>|;,()\[\]{}]+)*/?")
KEPT_PATH_PARTS = 2  # components kept of an absolute path: `run/final`, not the folders above it


def short_path(path: str) -> str:
    """An absolute path as `.../<its last KEPT_PATH_PARTS components>`; the home folder's own components
    are never kept (`/home/ann` becomes `...`)."""
    parts = [p for p in path.split("/") if p]
    home = [p for p in os.path.expanduser("~").split("/") if p]
    if home and parts[:len(home)] == home:
        parts = parts[len(home):]
    kept = parts[-KEPT_PATH_PARTS:]
    return "/".join(["...", *kept])


def scrub_paths(text: str) -> str:
    """`text` with every absolute local path shortened by `short_path`; relative paths, URLs and `a/b`
    are left alone."""
    return _ABS_PATH_RE.sub(lambda m: short_path(m[0]), text)


def scrub_paths_json(value):
    """A JSON value (dicts and lists, nested) with absolute paths shortened: a string that is a whole
    absolute path (spaces included) by `short_path`, any other string by `scrub_paths`. Keys are kept."""
    if isinstance(value, dict):
        return {k: scrub_paths_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths_json(v) for v in value]
    if isinstance(value, str):
        return short_path(value) if value.startswith("/") and "\n" not in value else scrub_paths(value)
    return value


def scrub_secrets(text: str, *extra: str | None) -> str:
    """`text` with secrets replaced by `***`: the values of SECRET_ENV_VARS and of `extra`, anything
    shaped like an HF token, and `HF_TOKEN=...` / `wandb_api_key: ...` assignments."""
    values = [os.environ.get(name) for name in SECRET_ENV_VARS] + list(extra)
    for value in sorted({v for v in values if v and len(v) >= 8}, key=len, reverse=True):
        text = text.replace(value, "***")  # a value under 8 characters is no secret, and would mangle text
    text = _HF_TOKEN_RE.sub("***", text)
    return _ASSIGNMENT_RE.sub(lambda m: f"{m[1]}{m[2]}***", text)


# --------------------------------------------------------------------------------------------------
# Model card

# The `info` that `write_model_card` reads. Only the first three keys are required; every other
# missing key (or None) leaves its line or section out of the card.
INFO_KEYS = {
    "stage": "pretrain | finetune | distill (also a tag)",
    "architecture": "transformers class, e.g. LlamaForCausalLM",
    "num_params": "parameter count (int)",
    "task": "text-generation (default) or text-classification: the pipeline tag and loading class",
    "name": "card title (default: '<family> <params> (<stage>)')",
    "family": "model_type, e.g. llama, gpt2",
    "num_layers": "transformer blocks (int)", "hidden_size": "model width (int)",
    "num_heads": "attention heads (int)", "vocab_size": "tokens (int)",
    "context_length": "tokens per sequence (int)",
    "tokens_seen": "training tokens (int)", "steps": "optimizer steps (int)",
    "global_batch_tokens": "tokens per optimizer step, all ranks (int)",
    "world_size": "ranks (int)", "device": "e.g. 'NVIDIA H100 80GB' or 'cpu'",
    "data_fingerprint": "str", "tokenizer_hash": "str",
    "metrics": "dict name -> float, e.g. {'val_loss': 3.21, 'val_perplexity': 24.8}",
    "labels": "classification: the label names in id order (config.id2label)",
    "lora": "LoRA settings when the model was fine-tuned with adapters (str)",
    "command": "the command line that produced the model (str)",
    "config_yaml": "the resolved config (str)",
    "parent": "parent checkpoint: a Hub model id (becomes base_model) or a local path (an absolute one is "
              "shortened to its last two components, as is every absolute path in the card)",
    "license": "license id for the front matter, e.g. apache-2.0",
    "repo_id": "ORG/NAME used in the loading snippet (default: a placeholder)",
}
REQUIRED_INFO = ("stage", "architecture", "num_params")
_TASKS = {"text-generation": ("text-generation", "AutoModelForCausalLM"),
          "causal-lm": ("text-generation", "AutoModelForCausalLM"),
          "text-classification": ("text-classification", "AutoModelForSequenceClassification"),
          "classification": ("text-classification", "AutoModelForSequenceClassification")}


def human(n: float, unit: str = "") -> str:
    """12_345_678 -> '12.3M': counts of parameters and tokens, as people quote them."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n:g}{unit}"


def human_bytes(n: int) -> str:
    for scale, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n} B"


def _metric(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"


def _hub_model_id(parent: str | None) -> str | None:
    """`parent` when it names a Hub model (not a local path), else None."""
    if not parent or parent.startswith(("/", ".", "~")) or Path(parent).exists():
        return None
    try:
        validate_repo_id(parent)
    except HFValidationError:
        return None
    return parent


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in `text`, so the block cannot end early."""
    return "`" * max(3, max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)


def _table(rows: list[tuple[str, object]], header: tuple[str, str] = ("", "")) -> list[str]:
    rows = [(k, v) for k, v in rows if v is not None]
    if not rows:
        return []
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def model_card(info: dict) -> str:
    """The README.md text for `info` (see INFO_KEYS), scrubbed of secrets and of absolute local paths."""
    missing = [k for k in REQUIRED_INFO if info.get(k) is None]
    if missing:
        raise ValueError(f"model card info lacks {', '.join(missing)} (required: {', '.join(REQUIRED_INFO)})")
    task = info.get("task") or "text-generation"
    if task not in _TASKS:
        raise ValueError(f"model card info: task '{task}' is not one of {', '.join(_TASKS)}")
    pipeline_tag, auto_class = _TASKS[task]
    get = info.get
    stage, arch, params = get("stage"), get("architecture"), int(get("num_params"))
    front = ModelCardData(library_name="transformers", tags=["lmforge", stage], license=get("license"),
                          pipeline_tag=pipeline_tag, base_model=_hub_model_id(get("parent"))).to_yaml()

    def n(key: str, unit: str = "") -> str | None:  # an int with thousands separators, or None when absent
        return None if get(key) is None else f"{get(key):,}{unit}"

    hardware = None
    if get("world_size") is not None or get("device"):
        hardware = " × ".join(str(x) for x in (get("world_size"), get("device")) if x is not None)
    title = get("name") or f"{get('family') or arch} {human(params)} ({stage})"

    lines = ["---", front, "---", "", f"# {title}", "",
             f"A {human(params)}-parameter `{arch}` ({pipeline_tag}) trained by the {stage} stage of "
             "lmforge and saved as a plain Hugging Face folder: it loads with "
             "`transformers` alone.", "", "## Model", ""]
    lines += _table([("Architecture", f"`{arch}`"), ("Family", get("family")),
                     ("Parameters", f"{human(params)} ({params:,})"), ("Layers", n("num_layers")),
                     ("Hidden size", n("hidden_size")), ("Attention heads", n("num_heads")),
                     ("Vocabulary", n("vocab_size", " tokens")), ("Context length", n("context_length", " tokens"))])
    tokens = None if get("tokens_seen") is None else f"{human(get('tokens_seen'))} ({get('tokens_seen'):,})"
    lines += ["## Training", ""] + _table([("Stage", stage), ("Tokens seen", tokens), ("Optimizer steps", n("steps")),
                                           ("Global batch", n("global_batch_tokens", " tokens")),
                                           ("LoRA", get("lora")), ("Hardware", hardware)])
    data = _table([(label, f"`{get(key)}`" if get(key) else None)
                   for label, key in (("Data fingerprint", "data_fingerprint"), ("Tokenizer hash", "tokenizer_hash"))])
    if data:
        lines += ["## Data", "", *data]
    if get("labels"):
        lines += ["## Labels", "", ", ".join(f"`{label}`" for label in get("labels")), ""]
    metrics = get("metrics") or {}
    if metrics:
        lines += ["## Results", "", *_table([(k, _metric(v)) for k, v in metrics.items()], ("Metric", "Value"))]

    model_id = get("repo_id") or "ORG/NAME"
    where = "" if get("repo_id") else "  # this folder's path, or the Hub repo it was pushed to"
    use = ['inputs = tokenizer("Hello, world", return_tensors="pt")']
    use += (["print(model.config.id2label[int(model(**inputs).logits.argmax(-1))])"]
            if pipeline_tag == "text-classification"
            else ["print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))"])
    lines += ["## How to load", "", "```python", f"from transformers import {auto_class}, AutoTokenizer", "",
              f'model_id = "{model_id}"{where}', f"model = {auto_class}.from_pretrained(model_id)",
              "tokenizer = AutoTokenizer.from_pretrained(model_id)", *use, "```", ""]

    if get("command") or get("config_yaml"):
        lines += ["## Reproduce", ""]
        if get("command"):
            fence = _fence(get("command"))
            lines += [f"{fence}bash", get("command").strip(), fence, ""]
        if get("config_yaml"):
            fence = _fence(get("config_yaml"))
            lines += ["The resolved config:", "", f"{fence}yaml", get("config_yaml").rstrip("\n"), fence, ""]
    parent = f" The parent checkpoint is `{get('parent')}`." if get("parent") else ""
    lines += ["## Lineage", "", "`lineage.json` beside this card records the tokenizer hash, data fingerprint, "
              f"parent checkpoint, git commit and config hash of every upstream stage.{parent}", ""]
    return scrub_paths(scrub_secrets("\n".join(lines)))


def write_model_card(folder: Path, info: dict) -> None:
    """Write `folder/README.md`, a Hugging Face model card for `info` (see INFO_KEYS), atomically."""
    atomic.write_text(Path(folder) / "README.md", model_card(info))


# --------------------------------------------------------------------------------------------------
# Push

# Never uploaded, whatever the folder holds: pickles (arbitrary code on load), DeepSpeed and ZeRO state,
# half-written files. Subfolders (checkpoints/, global_step*/) are never uploaded either.
NEVER_UPLOAD = ("*.pt", "*.pth", "*.pkl", "*.pickle", "*.bin", "*.ckpt", "*.tmp", "global_step*",
                "zero_to_fp32.py", "latest", ".*")


def upload_plan(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(name, bytes) of each file `push` would upload, sorted; HubError when `folder` is no HF model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder}: no such folder; give the Hugging Face folder written by `lmforge export` "
                       "(or a run's final/)")
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    kept = [f for f in files if not any(fnmatch.fnmatchcase(f, pat) for pat in NEVER_UPLOAD)]
    if {"adapter_config.json", "adapter_model.safetensors"} <= set(kept):  # a peft adapter (a LoRA run's
        return [(f, (folder / f).stat().st_size) for f in kept]            # final/adapter/): no config.json
    missing = [what for what, ok in (("config.json", "config.json" in kept),
                                     ("*.safetensors weights", any(f.endswith(".safetensors") for f in kept)))
               if not ok]
    if missing:
        pickles = [f for f in files if f not in kept and not f.startswith(".")]
        held = (f"; it holds {', '.join(pickles)}, which lmforge never uploads (pickles and training state)"
                if pickles else "")
        if any((folder / d).exists() for d in ("final", "checkpoints", "metrics.jsonl")):
            hint = "this looks like a run directory; push RUN_DIR/final or run `lmforge export` first"
        else:
            hint = "run `lmforge export RUN_DIR OUT_DIR` to write a Hugging Face folder"
        raise HubError(f"{folder}: not a Hugging Face model folder: it has no {' and no '.join(missing)}{held}; "
                       f"{hint}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded weights: every shard the index names must be here
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as e:
            raise HubError(f"{index}: unreadable safetensors index ({e}); re-run `lmforge export`") from None
        if shards - set(kept):
            raise HubError(f"{folder}: shards named by {index.name} are missing: "
                           f"{', '.join(sorted(shards - set(kept)))}; re-run `lmforge export`")
    return [(f, (folder / f).stat().st_size) for f in kept]


def check_repo_id(repo_id: str) -> None:
    """HubError unless `repo_id` is ORG/NAME as the Hub accepts it."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"invalid repo id '{repo_id}': {e}") from None
    if repo_id.count("/") != 1:
        raise HubError(f"invalid repo id '{repo_id}': give ORG/NAME (a user or organization, then the model name)")


def tree_url(repo_id: str, revision: str | None = None) -> str:
    return f"{constants.ENDPOINT}/{repo_id}/tree/{quote(revision or 'main', safe='')}"


# Files lmforge writes with local facts in them (paths of the run, its data and its parent): `push`
# uploads them rewritten by `public_text`. Other files go up byte for byte: a tokenizer's vocabulary
# may hold a token such as "/usr", which must not change.
# A LoRA run's final/adapter/ (peft's format) names its base model by the local path it was trained from.
REWRITTEN_ON_PUSH = ("README.md", "lineage.json", "adapter_config.json")


def public_text(name: str, text: str) -> str:
    """What `push` uploads for `name` (one of REWRITTEN_ON_PUSH) whose local content is `text`: absolute
    paths shortened and secrets scrubbed. The JSON files keep their layout (lineage.json: indent 2, sorted
    keys, as lmforge writes it; adapter_config.json: indent 2 in peft's key order)."""
    if name.endswith(".json"):
        try:
            return json.dumps(scrub_paths_json(json.loads(text)), indent=2, sort_keys=name == "lineage.json") + "\n"
        except ValueError:  # not JSON (hand-edited?): still no path goes up
            pass
    return scrub_paths(scrub_secrets(text))


def _literal(name: str) -> str:
    """An fnmatch pattern that matches exactly `name` (upload_folder's patterns are globs)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# The Hub client's HTTP errors (HfHubHTTPError's first base: httpx's or requests' HTTPError, which also
# covers transport failures) and OS-level ones (offline mode, connection refused, timeouts).
_HUB_ERRORS = (HfHubHTTPError.__bases__[0], OSError)


def _hub_failure(e: Exception, action: str, repo_id: str, token: str) -> HubError:
    """A HubError for a failed API call that carries no request headers and no token."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    org = repo_id.split("/")[0]
    hints = {401: "the token was rejected: set HF_TOKEN to a valid write token or run `hf auth login`",
             403: f"the token may not write to '{org}': use a token with write access to it",
             404: f"'{repo_id}' or the branch was not found (is the name right?)"}
    if isinstance(e, HfHubHTTPError):
        detail = e.server_message or str(e).split("\n")[0]
    else:
        detail = f"{type(e).__name__}: {e}"
        hints[None] = "cannot reach the Hub: check the network (and that HF_HUB_OFFLINE is not set)"
    hint = hints.get(status, "")
    message = f"{action} for {repo_id} failed" + (f" (HTTP {status})" if status else "") + f": {detail}"
    return HubError(scrub_secrets(message + (f"; {hint}" if hint else ""), token))


def push(folder: str | os.PathLike, repo_id: str, revision: str | None = None, private: bool = False,
         dry_run: bool = False, api=None) -> list[str]:
    """Upload an exported Hugging Face folder to `repo_id`, on branch `revision` (created when missing)
    or on main; returns the uploaded files' names, sorted. `dry_run` checks everything it can offline
    and returns what would be uploaded, without calling the Hub. `api`: an HfApi (tests pass a mock).

    Two steps: `upload_folder` sends the weights, config and tokenizer (huggingface_hub's resumable, possibly
    multi-commit upload), then one `create_commit` adds README.md, lineage.json (and an adapter's
    adapter_config.json) as `public_text` rewrites them, so the card appears once the weights are there."""
    folder = Path(folder)
    check_repo_id(repo_id)
    names = [name for name, _ in upload_plan(folder)]
    rewritten = {}  # read before any call: an unreadable card fails here, not between the two commits
    for name in (n for n in names if n in REWRITTEN_ON_PUSH):
        try:
            rewritten[name] = public_text(name, (folder / name).read_text(encoding="utf-8")).encode("utf-8")
        except UnicodeDecodeError as e:
            raise HubError(f"{folder / name}: not UTF-8 text ({e.reason}); re-run `lmforge export`") from None
    if dry_run:
        return names
    token = get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN (a write token from "
                       "https://huggingface.co/settings/tokens) or run `hf auth login`")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    branch = revision if revision and revision != "main" else None
    message = f"lmforge push: {folder.name}" + (f" ({branch})" if branch else "")
    action = "creating the repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch:
            action = f"creating branch '{branch}'"
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
        action = "uploading"
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=branch, repo_type="model",
                          allow_patterns=[_literal(n) for n in names if n not in rewritten],
                          ignore_patterns=list(NEVER_UPLOAD), commit_message=message)
        if rewritten:
            action = f"uploading {' and '.join(rewritten)}"
            api.create_commit(repo_id, operations=[CommitOperationAdd(path_in_repo=n, path_or_fileobj=data)
                                                   for n, data in rewritten.items()],
                              commit_message=f"{message}: {', '.join(rewritten)}", revision=branch, repo_type="model")
    except _HUB_ERRORS as e:
        raise _hub_failure(e, action, repo_id, token) from None
    return names


def _repo_id_arg(value: str) -> str:
    try:
        check_repo_id(value)
    except HubError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmforge push", description="Upload an exported Hugging Face folder (config.json, *.safetensors, "
        "tokenizer, README.md, lineage.json) to the Hub. Only the folder's top-level files go up; pickles "
        "(*.pt, *.bin, ...) and DeepSpeed state never do.",
        epilog="The token comes from HF_TOKEN or a stored `hf auth login`; it is never printed.")
    parser.add_argument("folder", metavar="HF_DIR", help="folder written by `lmforge export` (or RUN_DIR/final, "
                        "or a LoRA run's RUN_DIR/final/adapter)")
    parser.add_argument("--repo-id", required=True, type=_repo_id_arg, metavar="ORG/NAME", help="Hub model repo")
    parser.add_argument("--revision", metavar="BRANCH",
                        help="upload to this branch, created when missing, e.g. step-1000 (default: main)")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (has no effect on a repo that already exists)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the files that would be uploaded, with sizes, and exit without calling the Hub")
    parser.add_argument("--receipt", type=Path, metavar="FILE",
                        help="after the upload, write what was pushed (repo, branch, the folder's lineage step and "
                        "config digest) to this JSON file: `lmforge run` skips a push that has one")
    args = parser.parse_args(argv)
    try:
        names = push(args.folder, args.repo_id, revision=args.revision, private=args.private, dry_run=args.dry_run)
    except HubError as e:
        print(f"lmforge push: error: {e}", file=sys.stderr)
        return 1
    sizes = {name: (Path(args.folder) / name).stat().st_size for name in names}
    for name in names:
        print(f"  {human_bytes(sizes[name]):>9s}  {name}")
    total = f"{len(names)} files, {human_bytes(sum(sizes.values()))}"
    url = tree_url(args.repo_id, args.revision)
    print(f"dry run: would upload {total} to {url}" if args.dry_run else f"uploaded {total} to {url}")
    if args.receipt and not args.dry_run:
        lineage_file = Path(args.folder) / "lineage.json"
        lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
        args.receipt.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(args.receipt, {"repo_id": args.repo_id, "revision": args.revision or "main", "files": names,
                                         "lineage": {k: lineage.get(k) for k in ("config_digest", "step")}})
    return 0
