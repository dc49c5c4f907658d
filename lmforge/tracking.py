"""Rank-0 experiment tracking: metrics.jsonl, Weights & Biases (offline by default) and PNG plots.

Every rank builds a `Tracker`; only rank 0 does anything (other ranks never import wandb nor touch a
file). What rank 0 writes, all under RUN_DIR:

    metrics.jsonl   one JSON object per `log()` / `log_text()` call: {"step": N, <the keys sent to W&B>}.
                    Strict JSON: a NaN or infinite value (e.g. the loss of a window of only skipped steps)
                    is written as `null`; W&B still gets the float.
                    Appended and flushed line by line, so a crash loses at most the line being written.
                    On resume the lines at or after the resumed step are dropped first (and a fresh start
                    drops them all), so the file equals an uninterrupted run's.
    wandb_id.txt    the W&B run id, also `tracker.run_id` for the checkpoint: a resumed run (a Slurm
                    requeue included) continues the same W&B run.
    wandb/          W&B's own folder; `wandb sync RUN_DIR/wandb/offline-run-*` uploads an offline run later.
    plots/*.png     written by `finish()` (or `write_plots()`) from metrics.jsonl, so a resumed run plots
                    its whole history: loss, lr, throughput, grad_norm, mfu, accuracy (those logged).

W&B gets the job type, project/entity/group/name/tags, the config minus every key named like a
credential (`token`, `hf_token`, `*api_key*`, `*password*`, `*secret*`), each metric at its step, and
generated samples as HTML. W&B is a guest: an exception from it is reported once on stderr and turns W&B
off for the rest of the run, while training and metrics.jsonl go on.

Keys the plots look for (first one present wins; any other key is logged and stored, just not plotted):
    train/loss | loss, val/loss | eval/loss      loss, nats per token (per example for classifiers)
    train/lr | lr                                learning rate
    train/tokens_per_s | tokens_per_s            training tokens per second, all ranks together
    train/grad_norm | grad_norm                  global L2 norm of the gradient before clipping
    train/mfu | mfu                              model FLOPs utilisation, a fraction of peak (0..1)
    val/accuracy | eval/accuracy                 fraction of examples right
    tokens | train/tokens                        tokens trained on so far: the x axis when every point has it
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
import secrets
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from lmforge import atomic
from lmforge.config.tracking import TrackingConfig

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
PLOTS_DIR = "plots"

_TOKENS_KEYS = ("tokens", "train/tokens")


class _Plot(NamedTuple):
    file: str
    title: str
    ylabel: str
    series: tuple[tuple[str, tuple[str, ...]], ...]  # (legend label, accepted keys: the first present wins)
    smooth: bool = True  # per-step values are noisy: draw them faint with an EMA on top
    from_zero: bool = False  # a y axis from 0 keeps small wobbles small
    scale: str = "plain"  # "loss": log y over a wide range; "sci": x10^n offset; "eng": 52k


_PLOTS = (
    _Plot("loss.png", "Loss", "loss (nats)", (("train", ("train/loss", "loss")), ("val", ("val/loss", "eval/loss"))),
          scale="loss"),
    _Plot("lr.png", "Learning rate", "learning rate", (("lr", ("train/lr", "lr")),), smooth=False, scale="sci"),
    _Plot("throughput.png", "Throughput", "tokens/s (all ranks)",
          (("tokens/s", ("train/tokens_per_s", "tokens_per_s")),), from_zero=True, scale="eng"),
    _Plot("grad_norm.png", "Gradient norm", "global L2 norm (before clipping)",
          (("grad norm", ("train/grad_norm", "grad_norm")),), from_zero=True),
    _Plot("mfu.png", "Model FLOPs utilisation", "MFU (fraction of peak FLOP/s)", (("mfu", ("train/mfu", "mfu")),),
          from_zero=True),
    _Plot("accuracy.png", "Validation accuracy", "accuracy (fraction)",
          (("val", ("val/accuracy", "eval/accuracy")),), smooth=False),
)

# Words before `token` that name a vocabulary entry or a count, not a credential (`eos_token`, `max_token`).
_NOT_CREDENTIAL = {"eos", "bos", "pad", "unk", "sep", "cls", "mask", "special", "start", "end", "max", "min",
                   "num", "first", "last", "new", "sample", "image", "chat", "system", "user", "assistant"}
_SECRET_WORDS = {"password", "passwd", "secret", "secrets", "apikey", "credential", "credentials"}


def is_secret_key(key: str) -> bool:
    """Whether a config key names a credential: `token`, `hf_token`, `wandb_api_key`, `db_password`, ..."""
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower()) if w]
    if any(w in _SECRET_WORDS for w in words) or "api_key" in "_".join(words):
        return True
    return bool(words) and words[-1] == "token" and (len(words) == 1 or words[-2] not in _NOT_CREDENTIAL)


def redact(obj: Any) -> Any:
    """A copy of a config (dicts and lists, nested) without the keys `is_secret_key` flags."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items() if not is_secret_key(k)}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def has_wandb_login() -> bool:
    """Whether this machine holds W&B credentials: WANDB_API_KEY, an identity token file, or a stored
    `wandb login` (netrc entry or settings file) for the configured host. Reads files, never the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth import read_netrc_auth

        settings = wandb_setup.singleton().settings  # system settings file + env; starts no service
        return bool(settings.api_key or read_netrc_auth(host=settings.base_url))
    except Exception:  # no wandb, an unreadable netrc, a malformed key: no usable login
        return False


def resolve_mode(mode: str) -> str:
    """The W&B mode to run in: `online`, `offline`, or `disabled` (only from WANDB_MODE).

    `auto` follows WANDB_MODE when it is set (users set it on compute nodes), else goes online when
    credentials exist and offline otherwise, so a run never stops to ask for a login.
    """
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env if env in ("online", "disabled") else "offline")
    return "online" if has_wandb_login() else "offline"


def new_run_id() -> str:
    """A fresh W&B run id: 8 characters from [a-z0-9], like W&B's own."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _plain(value: Any) -> Any:
    """A JSON-ready value: numpy and torch scalars become Python numbers."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, RuntimeError):  # more than one element
            return value.tolist()
    return value


def strict_json(value: Any) -> Any:
    """`value` (dicts and lists, nested) made fit for strict JSON: numpy/torch numbers become Python ones
    and non-finite floats (NaN, +-inf) become None, which `json.dumps` writes as `null`. Python's json
    would otherwise write the bare `NaN` / `Infinity` that no strict reader (jq, JavaScript, Go, ...) parses."""
    value = _plain(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _json_line(record: dict) -> str:
    # allow_nan=False: a non-finite float that strict_json missed fails loudly instead of writing `NaN`
    return json.dumps(strict_json(record), default=str, allow_nan=False) + "\n"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) or a line without a step is skipped.
    A value logged as NaN or inf reads back as None (written as `null`); a file from before that, with bare
    `NaN`, still reads (as float NaN)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


class Tracker:
    """Rank-0 metrics.jsonl + W&B + plots for one stage run; a no-op on every other rank.

    `resume_step` is the step training resumes from (the first step this process logs): metrics at or
    after it are dropped and the W&B run in wandb_id.txt is continued unless `run_id` names one. None means
    a fresh start: earlier metrics are dropped and a new W&B run begins (unless `run_id` is given).
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: TrackingConfig, job_type: str, config: dict,
                 rank: int, run_id: str | None = None, resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.enabled = rank == 0
        self.run_id: str | None = None  # set on rank 0 when W&B is on; store it in checkpoints
        self._run = None  # the wandb Run, None when W&B is off or has failed
        self._wandb_floor = 0  # W&B drops (with a warning) a step below the last one it got
        self._file = None
        self._finished = False
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._open_metrics(resume_step)
        if cfg.wandb:
            self._start_wandb(job_type, config, run_id, resume_step)

    def _open_metrics(self, resume_step: int | None) -> None:
        path = self.run_dir / METRICS_FILE
        if path.exists():
            keep = [] if resume_step is None else [r for r in read_metrics(path) if r["step"] < resume_step]
            atomic.write_text(path, "".join(_json_line(r) for r in keep))  # an older file's NaN becomes null
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # line-buffered: flushed per record

    def _start_wandb(self, job_type: str, config: dict, run_id: str | None, resume_step: int | None) -> None:
        mode = resolve_mode(self.cfg.mode)
        if mode == "disabled":
            return
        id_file = self.run_dir / WANDB_ID_FILE
        if run_id is None and resume_step is not None and id_file.exists():
            run_id = id_file.read_text(encoding="utf-8").strip() or None
        self.run_id = run_id or new_run_id()
        atomic.write_text(id_file, self.run_id + "\n")  # before init: even a failed init keeps the id
        try:
            import wandb

            safe_config = json.loads(json.dumps(redact(config), default=str))  # plain JSON, no secrets
            self._run = wandb.init(
                project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group, job_type=job_type,
                name=self.cfg.name or self.run_dir.resolve().name, tags=self.cfg.tags or None,
                config=safe_config, dir=self.run_dir, id=self.run_id, resume="allow", mode=mode,
                reinit="create_new",  # one run per Tracker, even beside another in this process
            )
            self._wandb_floor = self._run.step  # a resumed online run already holds the steps below this
        except Exception as e:
            self._wandb_failed("init", e)

    def _wandb_failed(self, what: str, error: Exception) -> None:
        """Turn W&B off for the rest of the run; the run itself goes on. Runs at most once per run."""
        self._run = None
        print(f"lmforge: warning: W&B {what} failed ({type(error).__name__}: {error}); W&B logging is off "
              f"for the rest of this run, {self.run_dir / METRICS_FILE} still gets every metric",
              file=sys.stderr, flush=True)

    def _write(self, record: dict) -> None:
        self._file.write(_json_line(record))
        self._file.flush()

    def _send(self, step: int, make: Callable[[Any], dict]) -> None:
        if self._run is None or step < self._wandb_floor:  # below the floor: W&B has it or would drop it
            return
        try:
            import wandb

            self._run.log(make(wandb), step=step)
            self._wandb_floor = step  # the same step again merges into its row; a smaller one is skipped
        except Exception as e:
            self._wandb_failed("log", e)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` at optimizer step `step` (log steps in increasing order)."""
        if not self.enabled or self._finished:
            return
        values = {k: _plain(v) for k, v in metrics.items() if k != "step"}
        self._write({"step": int(step), **values})  # non-finite values as null
        self._send(int(step), lambda _: values)  # W&B keeps the float: it shows NaN and inf itself

    def log_text(self, step: int, key: str, text: str) -> None:
        """Record a generated sample: the text in metrics.jsonl, an HTML panel (with a step slider) in W&B."""
        if not self.enabled or self._finished:
            return
        self._write({"step": int(step), key: text})
        self._send(int(step), lambda wandb: {key: wandb.Html(f"<pre>{html.escape(text)}</pre>",
                                                             data_is_not_path=True)})

    def write_plots(self) -> list[Path]:
        """Plot metrics.jsonl into RUN_DIR/plots/ now (finish() does it too); returns the files written."""
        if not self.enabled or not (self.run_dir / METRICS_FILE).exists():
            return []
        return plot_metrics(read_metrics(self.run_dir / METRICS_FILE), self.run_dir / PLOTS_DIR,
                            title=self.cfg.name or self.run_dir.resolve().name)

    def finish(self, exit_code: int = 0) -> None:
        """Close metrics.jsonl and the W&B run, then write the plots (if `plots`). Safe to call twice."""
        if not self.enabled or self._finished:
            return
        self._finished = True
        self._file.close()
        if self._run is not None:
            try:
                self._run.finish(exit_code=exit_code)
            except Exception as e:
                self._wandb_failed("finish", e)
            self._run = None
        if self.cfg.plots:
            try:
                self.write_plots()
            except Exception as e:  # the model is trained and saved: a plot must not fail the stage
                print(f"lmforge: warning: plotting {self.run_dir / METRICS_FILE} failed "
                      f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)  # W&B marks the run failed on an exception


def _ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (what TensorBoard's smoothing shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot_metrics(records: list[dict], out_dir: str | os.PathLike, title: str = "") -> list[Path]:
    """One PNG per plot in `_PLOTS` whose keys appear in `records`; returns the files written."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's backend alone
    from matplotlib.ticker import EngFormatter, FuncFormatter

    tokens_at: dict[int, float] = {}
    for r in records:
        key = next((k for k in _TOKENS_KEYS if _is_number(r.get(k))), None)
        if key is not None:
            tokens_at[r["step"]] = float(r[key])
    written = []
    for plot in _PLOTS:
        curves = []
        for label, keys in plot.series:
            key = next((k for k in keys if any(_is_number(r.get(k)) for r in records)), None)
            if key is not None:
                curves.append((label, [(r["step"], float(r[key])) for r in records if _is_number(r.get(key))]))
        if not curves:
            continue
        by_tokens = all(s in tokens_at for _, pts in curves for s, _ in pts)
        fig = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
        ax = fig.add_subplot()
        for i, (label, pts) in enumerate(curves):
            xs = [tokens_at[s] if by_tokens else s for s, _ in pts]
            ys = [y for _, y in pts]
            if plot.smooth and len(ys) >= 100:  # fewer points: an EMA lags more than it smooths
                beta = min(0.98, 1 - 10 / len(ys))  # ~1/10 of the curve's width of memory
                ax.plot(xs, ys, color=f"C{i}", alpha=0.3, linewidth=0.8)
                ax.plot(xs, _ema(ys, beta), color=f"C{i}", linewidth=1.6, label=f"{label} (EMA {beta:.2f})")
            else:
                ax.plot(xs, ys, color=f"C{i}", marker="o" if len(ys) <= 50 else None, markersize=3,
                        linewidth=1.4, label=label)
        ys_all = [y for _, pts in curves for _, y in pts]
        if plot.scale == "loss" and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 4:
            ax.set_yscale("log")  # the first steps' loss would otherwise flatten the rest of the curve
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        elif plot.scale == "sci":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
        elif plot.scale == "eng":
            ax.yaxis.set_major_formatter(EngFormatter())
        if plot.from_zero:
            ax.set_ylim(bottom=0)
        ax.set_title(f"{plot.title} — {title}" if title else plot.title)
        ax.set_xlabel("tokens trained on" if by_tokens else "optimizer step")
        if by_tokens:
            ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_ylabel(plot.ylabel)
        ax.grid(True, alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
        if len(curves) > 1 or plot.smooth:  # say which curve is which, or what the faint one is
            ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic.write_bytes(Path(out_dir) / plot.file, buf.getvalue())
        written.append(Path(out_dir) / plot.file)
    return written


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_confusion(matrix: list[list[int]], labels: list, path: str | os.PathLike, title: str = "") -> Path:
    """A confusion matrix [truth][prediction] as a PNG: counts in the cells, rows normalised for the colour
    (recall per class reads along the diagonal)."""
    from matplotlib.figure import Figure

    n = len(labels)
    rows = [max(1, sum(r)) for r in matrix]
    side = max(4.0, 0.45 * n + 2)
    fig = Figure(figsize=(side + 1, side), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow([[c / rows[i] for c in r] for i, r in enumerate(matrix)], cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if matrix[i][j]:
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i][j] / rows[i] > 0.5 else "black")
    ax.set_xticks(range(n), [str(x) for x in labels], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), [str(x) for x in labels], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic.write_bytes(Path(path), buf.getvalue())
    return Path(path)
