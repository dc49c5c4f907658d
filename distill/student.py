"""The student's starting point, DistilBERT's way: the teacher's width with chosen teacher layers (embeddings,
final norm and head too), written once as a Hugging Face folder that every rank (and the no-KD baseline) loads.

A folder on disk rather than weights copied in memory: under ZeRO-3 the student is loaded partitioned by
transformers' own path (rank 0 reads, one module at a time is scattered), the baseline starts from the very
same weights, and the folder says what the student was before training.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import torch

from lmforge import atomic
from lmforge.checkpoint import TOKENIZER_FILES, model_class
from lmforge.models import ModelError

# A decoder layer's parameters, in every transformers causal LM and classifier lmforge builds: Llama-style
# `model.layers.N.` and GPT-2's `transformer.h.N.` (any prefix: a classifier's body is the same).
LAYER_KEY = re.compile(r"^(.*?\b(?:layers|h))\.(\d+)\.(.+)$")


def teacher_layers(config) -> int:
    return int(config.num_hidden_layers)


def subset_config(config, layers: list[int], source: Path):
    """The teacher's config with `layers` kept (checked against its depth)."""
    depth = teacher_layers(config)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ModelError(f"student.from_teacher.layers: {bad} out of range; the teacher {source} has {depth} layers "
                         f"(indices 0 to {depth - 1})")
    if len(set(layers)) != len(layers):
        raise ModelError(f"student.from_teacher.layers: {layers} repeats a layer; give each teacher layer once")
    out = copy.deepcopy(config)
    out.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (sliding / full)
        out.layer_types = [config.layer_types[i] for i in layers]
    return out


def from_teacher(teacher: Path, config, layers: list[int], out: Path, identity: dict) -> None:
    """Write `out`: a Hugging Face folder of the student `subset_config` describes, teacher layer `layers[j]`
    copied into student layer j, every other weight (embeddings, norms, head) copied as it is, and the
    teacher's tokenizer; `identity` (the teacher's digests and the layers) is kept in student_init.json. Atomic:
    `out` is whole or absent. An `out` already made for this `identity` is kept; one made for another is replaced
    (a checkpoint trained from it is refused by the resume check)."""
    import json

    from safetensors.torch import load_file

    mark = Path(out) / "student_init.json"
    if mark.is_file() and json.loads(mark.read_text()) == identity:
        return

    student = subset_config(config, layers, teacher)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(teacher).glob("*.safetensors")):
        state.update(load_file(str(path)))
    if not state:
        raise ModelError(f"teacher: {teacher} has no safetensors weights to copy layers from")
    where = {teacher_index: j for j, teacher_index in enumerate(layers)}
    copied: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = LAYER_KEY.match(key)
        if match is None:
            copied[key] = value
        elif int(match.group(2)) in where:
            copied[f"{match.group(1)}.{where[int(match.group(2))]}.{match.group(3)}"] = value
    seen = {int(m.group(2)) for m in map(LAYER_KEY.match, state) if m}
    if len(seen) != teacher_layers(config):
        raise ModelError(f"teacher: {teacher}'s weights name {len(seen)} layers, its config {teacher_layers(config)}; "
                         "lmforge copies layers named `...layers.N.` or `...h.N.`")

    def fill(tmp: Path) -> None:
        with torch.device("meta"):  # the state dict is what gets written: no second copy
            model = model_class(student)(student)
        model.save_pretrained(tmp, state_dict=copied, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (Path(teacher) / name).is_file():
                shutil.copyfile(Path(teacher) / name, tmp / name)
        (tmp / mark.name).write_text(json.dumps(identity, sort_keys=True) + "\n")

    atomic.publish_folder(Path(out), fill)


class Projections(torch.nn.Module):
    """Learned maps from the student's hidden width to the teacher's, one per hidden-state pair (when the widths
    differ). Trained with the student, saved in its checkpoints, left out of the export."""

    PREFIX = "distill_projections."

    def __init__(self, pairs: int, student_width: int, teacher_width: int):
        super().__init__()
        self.maps = torch.nn.ModuleList(torch.nn.Linear(student_width, teacher_width, bias=False) for _ in range(pairs))

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.maps[index](hidden)
