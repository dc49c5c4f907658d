"""Whether a stage's output is complete for its config, from the stage's own records on disk (no torch, no stage
imported): token shards' meta.json with the same output digest; a training run's final/lineage.json with the same
result digest (`config.base.result_digest`: what shapes the model) at train.max_steps, plus summary.json and a
distillation's report.json; an export's lineage.json equal to its run's; a push's receipt.

lmforge.pipeline asks it for every stage of a pipeline; slurm/train.sbatch asks it after its workers exit, whether
the stage finished or made progress (`python -m lmforge.completion [--newest | --since STEP] STAGE CONFIG ...`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.config import ConfigError, load_config
from lmforge.config.base import DIGEST_VERSION, RUN_ONLY, result_digest
from lmforge.config.pipeline import TRAINING_KINDS


def schema(kind: str):
    """The stage config schema of `kind` (the config package is the core's: no stage is imported)."""
    from lmforge.config.distill import DistillConfig
    from lmforge.config.finetune import FinetuneConfig
    from lmforge.config.pretrain import PretrainConfig
    from lmforge.config.tokenize import TokenizeConfig

    return {"tokenize": TokenizeConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig,
            "distill": DistillConfig}[kind]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def flatten(data, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        out: dict[str, object] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def differences(old: dict, new: dict, limit: int = 3) -> str:
    """`optim.lr 0.003 -> 0.001, ...`: what changed between two resolved configs."""
    a, b = flatten(old), flatten(new)
    changed = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    more = f" (+{len(changed) - limit} more)" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more if changed else "the config"


def state(kind: str, config, output: Path, source: str | None = None, receipt: Path | None = None,
          push: tuple[str | None, str | None] = (None, None)) -> tuple[str, str]:
    """(done | changed | partial | new, why), from the stage's own records on disk."""
    out = Path(output)
    if kind == "tokenize":
        meta = read_json(out / "meta.json")
        if meta is not None:
            if meta.get("config_digest") == config.output_digest() or older_match(meta, out, config):
                return "done", f"{out}/meta.json matches this config"
            return "changed", f"{out} holds tokens of another config: " + differences(
                meta.get("config", {}), config.model_dump(mode="json", exclude={"out_dir", "workers", "progress"}))
        state = read_json(out / "chunks" / "state.json")
        if state is not None:
            if state.get("config_digest") != config.output_digest() and not older_match(state, out, config):
                return "changed", f"{out} holds a stopped run of another config"
            return "partial", "stopped part-way: resumes"
        return "new", "not run yet"
    if kind in TRAINING_KINDS:
        lineage = read_json(out / "final" / "lineage.json")
        needed = ["summary.json"] + (["report.json"] if kind == "distill" else [])
        if lineage is not None:
            made, steps, want = lineage.get("result_digest"), lineage.get("step"), config.train.max_steps
            same = made == result_digest(config) if made else lineage.get("config_digest") == config.digest()
            same = same or older_match(lineage, out, config, result_digest)
            if not same:
                return "changed", f"{out}/final was made from another config: " + differences(
                    result_config(out / "config.yaml", kind), config.model_dump(mode="json", exclude=RUN_ONLY))
            if made and want is not None and steps != want:
                if steps < want:  # the resume checks decide at launch whether it may go on
                    return "partial", f"{out}/final holds step {steps}; train.max_steps is {want}: trains on"
                return "changed", f"{out}/final holds step {steps}, past train.max_steps {want}"
            missing = [n for n in needed if not (out / n).exists()]
            if not missing:
                return "done", f"{out}/final holds step {lineage.get('step')} of this config"
            return "partial", f"{', '.join(missing)} missing: the stage finishes it"
        if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
            return "partial", "checkpoints present: resumes from the newest"
        return "new", "not run yet"
    if kind == "export":
        made, src = read_json(out / "lineage.json"), read_json(Path(source) / "final" / "lineage.json")
        if made is None:
            return "new", "not run yet"
        if src is not None and (made.get("config_digest"), made.get("step")) == (src.get("config_digest"), src.get("step")):
            return "done", f"{out} is step {made.get('step')} of {source}"
        return "changed", f"{out} is not the newest export of {source}"
    (repo_id, revision), src = push, read_json(Path(source) / "lineage.json")
    made = read_json(receipt)
    if made is None:
        return "new", "not pushed yet"
    want = {"repo_id": repo_id, "revision": revision or "main",
            "lineage": src and {k: src.get(k) for k in ("config_digest", "step")}}
    if {k: made.get(k) for k in want} == want:
        return "done", f"pushed to {repo_id}@{want['revision']}"
    return "changed", f"{source} changed since it was pushed"


def older_match(record: dict, out: Path, config, digest=None) -> bool:
    """Whether a record written by an older lmforge (digest version 1: every value hashed, a key added since
    counted as a change) was made from this config: the config.yaml saved beside it, read with today's schema
    (keys added since at their defaults), gives today's digest. Upgrading lmforge does not make outputs stale."""
    if record.get("digest_version", 1) >= DIGEST_VERSION:
        return False
    digest = digest or (lambda c: c.output_digest())
    try:
        return digest(load_config(out / "config.yaml", type(config))) == digest(config)
    except (ConfigError, OSError):
        return False


def result_config(path: Path, kind: str) -> dict:
    """A run folder's saved config.yaml as the digest sees it (RUN_ONLY left out), {} when unreadable."""
    try:
        return load_config(path, schema(kind)).model_dump(mode="json", exclude=RUN_ONLY)
    except ConfigError:
        return {}




def newest_checkpoint(run_dir: Path) -> int:
    """The newest committed checkpoint's step in a run folder (commit record written), plus its no-KD baseline's
    (a distillation trains RUN_DIR/baseline first): it grows whenever either run saves. 0 if none."""
    def newest(pattern: str) -> int:
        return max((int(p.parent.name.removeprefix("step-")) for p in Path(run_dir).glob(pattern)
                    if p.parent.name.removeprefix("step-").isdigit()), default=0)

    return newest("checkpoints/step-*/lmforge.json") + newest("baseline/checkpoints/step-*/lmforge.json")


def main(argv: list[str]) -> int:
    """What slurm/train.sbatch asks about its stage, without torch: `python -m lmforge.completion [--newest | --since
    STEP] STAGE CONFIG [key=value ...]`. --newest prints the newest committed checkpoint's step. Otherwise: exit 0
    when the stage's output is complete for this config; 1 when not, but a checkpoint newer than STEP is there (a
    run stopped by a signal or train.max_time: requeue); 3 when not and no newer one (requeueing would loop
    without progress); 2 on a bad config."""
    mode, since = "check", -1
    if argv[:1] == ["--newest"]:
        mode, argv = "newest", argv[1:]
    elif argv[:1] == ["--since"] and len(argv) > 1 and argv[1].isdigit():
        since, argv = int(argv[1]), argv[2:]
    if len(argv) < 2 or argv[0] not in TRAINING_KINDS + ("tokenize",):
        print("usage: python -m lmforge.completion [--newest | --since STEP] pretrain|finetune|distill CONFIG "
              "[key=value ...]", file=sys.stderr)
        return 2
    kind, config, *overrides = argv
    try:
        cfg = load_config(config, schema(kind), overrides)
    except ConfigError as e:
        print(f"lmforge: {e}", file=sys.stderr)
        return 2
    output = Path(cfg.out_dir if kind == "tokenize" else cfg.run_dir)
    if mode == "newest":
        print(newest_checkpoint(output))
        return 0
    done, why = state(kind, cfg, output)
    if done == "done":
        print(f"[{kind}] finished: {why}", flush=True)
        return 0
    newest = newest_checkpoint(output)
    print(f"[{kind}] not finished: {why}; newest checkpoint: step {newest}", flush=True)
    return 1 if newest > since else 3


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
