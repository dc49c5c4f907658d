"""Task examples (fine-tuning, classifier distillation): read (local JSONL/CSV/Parquet, Hub datasets from the
cache, built-in tasks), checked before any training, tokenized, and batched with right padding.

Every bad input is an error naming the file, the line (or row) and the field: a missing field, a label in
validation/test that training never saw, an empty split, a chat message without a role, an example past
`task.max_length` under `truncation: error`. Nothing is dropped silently: truncated examples are counted and
reported. Right padding needs no attention mask for a causal model: a token never attends to positions after
it, so the pads change no real token's output (and the classifiers read the last non-pad token).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.config.finetune import FinetuneDataConfig, SplitSource, TaskConfig
from lmforge.data.sources import DataError

IGNORE = -100  # target id that takes no part in the loss (prompt tokens, padding)

# The chat template written into the exported tokenizer when the starting model's tokenizer has none, so that
# `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives exactly the training prompts.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token }}"
    "{% if not loop.last %}\n\n{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------------------
# Reading


def read_split(src: SplitSource) -> list[tuple[str, dict]]:
    """The records of one split as (where, record): `where` names the file and line (or row) for errors."""
    if src.hf is not None:
        return _read_hf(src)
    path = Path(src.path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        out = []
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{number}: not valid JSON ({e.msg}); one JSON object per line") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{path}:{number}: a JSON object per line expected, got {type(record).__name__}")
                    out.append((f"{path}:{number}", record))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: invalid UTF-8 near byte {e.start} (line {len(out) + 1}); "
                                "save the file as UTF-8") from None
        return out
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            return [(f"{path}:{reader.line_num}", dict(row)) for row in reader]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    raise DataError(f"{path}: unknown format {suffix!r}; use .jsonl, .csv or .parquet")


def _read_hf(src: SplitSource) -> list[tuple[str, dict]]:
    import datasets

    name = src.describe()
    try:
        ds = datasets.load_dataset(src.hf, src.config, split=src.split)
    except Exception as e:  # datasets raises many kinds: not cached offline, no such split, no such config
        raise DataError(f"{name}: cannot load this Hub dataset ({type(e).__name__}: {str(e)[:300]}); offline "
                        "(HF_HUB_OFFLINE=1) it must be in the datasets cache already") from None
    return [(f"{name} row {i}", row) for i, row in enumerate(ds)]


def builtin_splits(folder: Path) -> dict[str, SplitSource]:
    """The split files `python -m lmforge.data.tasks` wrote into `folder`."""
    return {s: SplitSource(path=Path(folder) / f"{s}.jsonl") for s in ("train", "validation", "test")}


def load_records(cfg: FinetuneDataConfig, seed: int, builtin_dir: Path | None = None
                 ) -> dict[str, list[tuple[str, dict]]]:
    """{"train", "validation", "test"} -> records; validation carved from train (seeded) when not given."""
    sources = builtin_splits(builtin_dir) if cfg.builtin else \
        {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    out = {s: read_split(src) if src is not None else None for s, src in sources.items()}
    if not out["train"]:
        raise DataError(f"{sources['train'].describe()}: the train split is empty")
    if out["validation"] is None:
        records = list(out["train"])
        random.Random(seed).shuffle(records)
        cut = max(1, round(len(records) * cfg.val_fraction))
        if cut >= len(records):
            raise DataError(f"{sources['train'].describe()}: {len(records)} examples are too few to hold out "
                            f"data.val_fraction={cfg.val_fraction} for validation; give a validation split")
        out["validation"], out["train"] = records[:cut], records[cut:]
    for split in ("validation", "test"):
        if out[split] is not None and not out[split]:
            raise DataError(f"{sources[split].describe()}: the {split} split is empty")
    return out


def field_of(record: dict, name: str, where: str, kinds=(str,)):
    if name not in record:
        raise DataError(f"{where}: no field {name!r} (fields: {', '.join(map(str, record)) or 'none'}); set the "
                        "data.*_field keys to the names your data uses")
    value = record[name]
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise DataError(f"{where}: field {name!r} is a {type(value).__name__}; expected "
                        f"{' or '.join(k.__name__ for k in kinds)}")
    return value


# --------------------------------------------------------------------------------------------------
# Encoding


@dataclass
class Examples:
    """One split, tokenized: `ids[i]` the tokens, `targets[i]` a label (classification) or per-token targets
    aligned with ids (SFT: IGNORE on everything but responses). SFT keeps prompts and answers for exact match."""

    ids: list[np.ndarray]
    targets: list  # int per example, or np.ndarray per example
    truncated: int = 0
    prompts: list[np.ndarray] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def target_tokens(self, index: int) -> int:
        """Tokens that count in the loss of example `index` (its shifted targets that are not IGNORE)."""
        return int((self.targets[index][1:] != IGNORE).sum())


def cut(ids: list[int], task: TaskConfig, where: str) -> tuple[list[int], bool]:
    if len(ids) <= task.max_length:
        return ids, False
    if task.truncation == "error":
        raise DataError(f"{where}: {len(ids)} tokens, more than task.max_length={task.max_length}; raise it, or set "
                        "task.truncation to right or left")
    return (ids[:task.max_length] if task.truncation == "right" else ids[-task.max_length:]), True


def label_set(records: list[tuple[str, dict]], cfg: FinetuneDataConfig) -> list:
    """The labels training has, sorted (numbers numerically, strings alphabetically): their ids."""
    labels = {field_of(r, cfg.label_field, w, (str, int)) for w, r in records}
    if len({type(x) for x in labels}) > 1:
        raise DataError(f"the train split mixes numeric and text labels in {cfg.label_field!r}; use one kind")
    return sorted(labels)


def encode_classification(records, tokenizer, task: TaskConfig, cfg: FinetuneDataConfig, labels: list,
                          split: str) -> Examples:
    index = {label: i for i, label in enumerate(labels)}
    ids, targets, truncated = [], [], 0
    for where, r in records:
        label = field_of(r, cfg.label_field, where, (str, int))
        if label not in index:
            raise DataError(f"{where}: label {label!r} never occurs in the train split (labels: "
                            f"{', '.join(map(str, labels[:20]))}{'...' if len(labels) > 20 else ''}); a {split} label "
                            "must be one the model can learn")
        # as transformers' text-classification pipeline encodes it (special tokens, the pair template), so that
        # the exported model predicts there what it predicted here
        text = field_of(r, cfg.text_field, where)
        pair = field_of(r, cfg.text_pair_field, where) if cfg.text_pair_field else None
        tokens = tokenizer(text, text_pair=pair)["input_ids"]
        if not text.strip():
            raise DataError(f"{where}: field {cfg.text_field!r} is empty")
        tokens, was_cut = cut(tokens, task, where)
        truncated += was_cut
        ids.append(np.asarray(tokens, dtype=np.int64))
        targets.append(index[label])
    return Examples(ids, targets, truncated)


def messages_of(record: dict, cfg: FinetuneDataConfig, where: str) -> list[dict]:
    if cfg.messages_field is None:
        return [{"role": "user", "content": field_of(record, cfg.prompt_field, where)},
                {"role": "assistant", "content": field_of(record, cfg.response_field, where)}]
    messages = field_of(record, cfg.messages_field, where, (list,))
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {cfg.messages_field}[{i}] needs a role ({', '.join(ROLES)}) and a text "
                            f"content; got {json.dumps(m)[:120]}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: {cfg.messages_field} has no assistant message: nothing to learn")
    return messages


def encode_sft(records, tokenizer, task: TaskConfig, cfg: FinetuneDataConfig, keep_prompts: int = 0) -> Examples:
    """Each conversation rendered with the tokenizer's chat template, a turn at a time: the text the template
    adds for an assistant turn (after the generation prompt) is a target, everything else is context.
    Each piece is tokenized on its own, so the mask falls exactly on the response tokens."""
    def render(messages, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    ex = Examples([], [])
    for n, (where, r) in enumerate(records):
        messages = messages_of(r, cfg, where)
        ids, targets, done = [], [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, upto = render(messages[:i], True), render(messages[:i + 1])
            if not (prompt.startswith(done) and upto.startswith(prompt)):
                raise DataError(f"{where}: the tokenizer's chat template does not render this conversation "
                                "turn by turn (a turn's text changes what came before); use a template that does")
            context, answer = encode(prompt[len(done):]), encode(upto[len(prompt):])
            if n < keep_prompts and not ids:  # its end, leaving room for the answer within max_length
                room = max(1, task.max_length - task.max_new_tokens)
                ex.prompts.append(np.asarray(context[-room:], dtype=np.int64))
                ex.answers.append(m["content"])
            ids += context + answer
            targets += [IGNORE] * len(context) + answer
            done = upto
        ids, was_cut = cut(ids, task, where)
        targets = cut(targets, task, where)[0]
        if not any(t != IGNORE for t in targets[1:]):
            raise DataError(f"{where}: no response token left within task.max_length={task.max_length}"
                            + (" (right truncation cut it off: set task.truncation=left, or raise max_length)"
                               if was_cut else ""))
        ex.truncated += was_cut
        ex.ids.append(np.asarray(ids, dtype=np.int64))
        ex.targets.append(np.asarray(targets, dtype=np.int64))
    return ex


def batch(ex: Examples, indices: list[int], pad_id: int, sft: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, targets), right-padded to the longest example of the batch. Classification: ids [B, T] and
    the labels [B]; SFT: ids [B, T - 1] and their next tokens [B, T - 1] (IGNORE on context and padding)."""
    width = max(len(ex.ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    for row, i in enumerate(indices):
        ids[row, :len(ex.ids[i])] = torch.from_numpy(ex.ids[i])
    if not sft:
        return ids, torch.tensor([ex.targets[i] for i in indices], dtype=torch.long)
    targets = torch.full((len(indices), width), IGNORE, dtype=torch.long)
    for row, i in enumerate(indices):
        targets[row, :len(ex.targets[i])] = torch.from_numpy(ex.targets[i])
    return ids[:, :-1], targets[:, 1:]
