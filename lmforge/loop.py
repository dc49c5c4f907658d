"""Step mechanics shared by the training stages' `while` loops: the optimizer step over micro-batches,
the bad-step streak, the logging window, evaluation slices, the next batch prepared ahead, the status line.

Host syncs are counted, not sprinkled: a micro-batch's loss stays on the device (summed there), the
gradient norm is read once per step (DeepSpeed reads it anyway to skip non-finite steps), and the
logging window is reduced across ranks once per log line.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from lmforge import engine as eng


class Stepper:
    """One optimizer step over `accum` micro-batches: call `backward(loss)` once per micro-batch; after the
    last one the engine has stepped and `result()` gives (mean loss on the device, gradient norm).

    DeepSpeed scales each loss by 1/accum, reduces gradients across ranks at the boundary, clips, and under
    ZeRO 1-3 skips an update whose global gradient norm is not finite. ZeRO-0 reports no norm and does not
    skip: here the norm comes from the gradients and a non-finite one makes the update a no-op (DeepSpeed's
    counters still advance). A non-finite loss on any rank makes the all-reduced norm non-finite on every
    rank, so every rank makes the same decision without another collective."""

    def __init__(self, engine, accum: int):
        self.engine, self.accum = engine, accum
        self.zero0 = eng.zero_stage(engine.config) == 0
        self._loss: torch.Tensor | None = None
        self._count = 0
        self.norm: float | None = None

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        last = self._count == self.accum - 1
        norm = eng.params_grad_norm(self.engine.module) if last and self.zero0 else None
        with eng.update_skipped(self.engine, skip=norm is not None and not math.isfinite(norm)):
            self.engine.step()
        detached = loss.detach().float()
        self._loss = detached if self._loss is None else self._loss + detached
        self._count += 1
        if last:
            self.norm = norm if self.zero0 else eng.grad_norm(self.engine)

    def result(self) -> tuple[torch.Tensor, float | None]:
        """(the step's mean micro-batch loss, a device tensor; the global gradient norm before clipping)."""
        if self._count != self.accum:
            raise RuntimeError(f"{self._count} backward calls for a step of {self.accum} micro-batches")
        loss, norm = self._loss / self.accum, self.norm
        self._loss, self._count, self.norm = None, 0, None
        return loss, norm


class Health:
    """The streak of steps skipped for a non-finite gradient norm; a run aborts after `max_bad` in a row."""

    def __init__(self, max_bad: int, skipped: int = 0):
        self.max_bad, self.skipped, self.streak = max_bad, skipped, 0

    def update(self, norm: float | None) -> bool:
        """Record a step; True when it was skipped (non-finite norm)."""
        if norm is not None and not math.isfinite(norm):
            self.skipped, self.streak = self.skipped + 1, self.streak + 1
            return True
        self.streak = 0
        return False

    @property
    def exhausted(self) -> bool:
        return self.streak >= self.max_bad

    def check(self, norm: float | None, step: int, logged: dict, say) -> str:
        """After a step: "ok" (count its loss), "skipped" (non-finite norm: no update on any rank; said and
        logged), or "abort" (train.max_bad_steps in a row: said on stderr; the stage stops unsaved)."""
        if not self.update(norm):
            return "ok"
        logged["train/skipped_steps"] = self.skipped
        say(f"step {step}: non-finite gradient norm ({norm}); update skipped on all ranks "
            f"({self.streak} in a row, {self.skipped} in all)")
        if self.exhausted:
            say(self.abort_message(), file=sys.stderr)
            return "abort"
        return "skipped"

    def abort_message(self) -> str:
        return (f"error: {self.streak} consecutive steps with a non-finite loss or gradient (train.max_bad_steps); "
                "stopping without saving. The last checkpoint holds finite weights: lower optim.lr, raise warmup, "
                "or check the data, then rerun to resume")


class Window:
    """Per-step losses since the last log line, summed on the device (no host sync per step) and reduced
    across ranks once per log line, with the peak memory of any rank."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of step losses, steps)

    def add(self, loss: torch.Tensor) -> None:
        self.sums[0] += loss.double()
        self.sums[1] += 1

    def reduce(self) -> float:
        """The mean loss over every rank's steps in the window (NaN for a window of only skipped steps,
        not 0); resets the window. A collective."""
        total, count = eng.all_reduce_sum(self.sums.tolist(), self.device)
        self.sums.zero_()
        return total / count if count else float("nan")


def eval_slices(count: int, micro: int, rank: int, world: int) -> Iterator[tuple[list[int], bool]]:
    """This rank's share of `count` evaluation items, in micro-batches: (item indices, real). Every rank
    runs the same number of forwards (under ZeRO-3 a forward is a collective); a rank that has run out
    gets a filler batch (`real` False) whose result it must discard."""
    mine = list(range(rank, count, world))
    batches = math.ceil(math.ceil(count / world) / micro)
    for b in range(batches):
        ids = mine[b * micro:(b + 1) * micro]
        yield (ids, True) if ids else ([0], False)


def classification_scores(confusion: torch.Tensor, prefix: str) -> dict:
    """Accuracy, macro-F1 (over the classes present in truth or prediction) and the confusion matrix itself, from a
    [truth, prediction] count matrix summed over every rank."""
    tp = confusion.diag()
    seen = confusion.sum(0) + confusion.sum(1)
    f1 = 2 * tp / seen.clamp(min=1)
    return {f"{prefix}/accuracy": float(tp.sum() / confusion.sum()), f"{prefix}/macro_f1": float(f1[seen > 0].mean()),
            f"{prefix}/confusion": confusion.long().tolist()}


def per_class(confusion: list[list[int]], labels: list) -> list[dict]:
    """Precision, recall, F1 and support of each class from a confusion matrix [truth][prediction]."""
    out = []
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted, support = sum(row[i] for row in confusion), sum(confusion[i])
        precision, recall = tp / max(predicted, 1), tp / max(support, 1)
        out.append({"label": label, "precision": precision, "recall": recall, "support": support,
                    "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0})
    return out


def prefetch(batches: Iterable, device: torch.device) -> Iterator:
    """Yield `batches` (tensors, or tuples of tensors) on `device`, the next one's host-to-device copy started
    before the current one is used (pinned memory, non_blocking) so it overlaps the step on a GPU. On CPU it
    passes them through."""
    if device.type != "cuda":
        yield from batches
        return
    ahead = None
    for batch in batches:
        ready = tuple(t.pin_memory().to(device, non_blocking=True) for t in batch) if isinstance(batch, tuple) \
            else batch.pin_memory().to(device, non_blocking=True)
        if ahead is not None:
            yield ahead
        ahead = ready
    if ahead is not None:
        yield ahead


def memory(device: torch.device) -> dict[str, float]:
    """Peak memory of any rank since the last call, in GB (one collective): allocated, and on CUDA reserved
    too (what the caching allocator holds: the figure an out-of-memory error is about)."""
    from lmforge.throughput import memory_window

    mem = memory_window(device)
    allocated, reserved = eng.all_reduce_max_list([mem["allocated"], mem["reserved"]], device)
    return {"train/memory_gb": allocated / 1e9} | ({"train/memory_reserved_gb": reserved / 1e9}
                                                    if device.type == "cuda" else {})


def status(step: int, max_steps: int, metrics: dict, eta: str) -> str:
    """The periodic one-line training status (rank 0 prints it after the stage's name)."""
    norm = metrics.get("train/grad_norm")
    return (f"step {step}/{max_steps} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.2e} | "
            f"gnorm {norm if norm is not None else float('nan'):.3f} | {metrics['train/tokens_per_s']:,.0f} tok/s | "
            f"MFU {100 * metrics['train/mfu']:.1f}% | mem {metrics['train/memory_gb']:.2f} GB"
            + (f" (reserved {metrics['train/memory_reserved_gb']:.2f})" if "train/memory_reserved_gb" in metrics else "")
            + f" | ETA {eta}")


def metrics_line(metrics: dict) -> str:
    """Evaluation metrics in a line: "loss 1.2345, ppl 3.44, accuracy 81.2%" (rates as percentages)."""
    parts = []
    for key, value in metrics.items():
        if not isinstance(value, float):
            continue
        name = key.split("/")[-1]
        rate = name in ("accuracy", "macro_f1", "exact_match")
        parts.append(f"{name} {100 * value:.1f}%" if rate else f"{name} {value:.4f}")
    return ", ".join(parts)


def sample(engine, tokenizer_json: Path, prompt: str, max_new_tokens: int, eos_id: int, synced: bool) -> str:
    """A greedy continuation of `prompt` (no RNG drawn: a resumed run stays exact), with a repetition penalty
    so a young model's sample reads as text rather than one token over and over. Under ZeRO-3 (`synced`)
    generation is a collective: every rank calls this."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids], device=engine.device)
    engine.eval()
    with torch.no_grad():
        out = engine.module.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.3,
                                     pad_token_id=eos_id, eos_token_id=eos_id, synced_gpus=synced)
    engine.train()
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


def trace_file(rank: int):
    """Tests: LMFORGE_TRACE_DIR makes every rank record the first tokens of each row it trains on."""
    trace_dir = os.environ.get("LMFORGE_TRACE_DIR")
    return open(Path(trace_dir) / f"trace-rank{rank}.jsonl", "a", buffering=1) if trace_dir else None  # noqa: SIM115
