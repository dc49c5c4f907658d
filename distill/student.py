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
from lmforge.checkpoint import TOKENIZER_FILES, config_digest, model_class, weights_digest
from lmforge.models import ModelError, classifier_config, folder_config, model_config
from lmforge.tokenizer import vocabulary_hash

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

    from safetensors import safe_open

    mark = Path(out) / "student_init.json"
    if mark.is_file() and json.loads(mark.read_text()) == identity:
        return
    student = subset_config(config, layers, teacher)
    files = sorted(Path(teacher).glob("*.safetensors"))
    if not files:
        raise ModelError(f"teacher: {teacher} has no safetensors weights to copy layers from")
    where = {teacher_index: j for j, teacher_index in enumerate(layers)}
    copied: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for path in files:  # only the kept tensors are read: half of a 70B teacher is 70 GB less in rank 0's memory
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                match = LAYER_KEY.match(key)
                if match is None:
                    copied[key] = f.get_tensor(key)
                    continue
                seen.add(int(match.group(2)))
                if int(match.group(2)) in where:
                    copied[f"{match.group(1)}.{where[int(match.group(2))]}.{match.group(3)}"] = f.get_tensor(key)
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


def identities(cfg, teacher_config) -> tuple[dict, dict | None]:
    """The teacher's identity (config digest, weights digest) and the student's start's (from_teacher: that teacher
    and the layers; init_from: the folder's weights; a fresh student: None). Rank 0 reads the files."""
    teacher_id = {"config": config_digest(teacher_config), "weights": weights_digest(cfg.teacher)}
    if cfg.student.from_teacher:
        return teacher_id, {"teacher": teacher_id, "layers": cfg.student.from_teacher.layers}
    if cfg.student.init_from:
        return teacher_id, {"folder": str(cfg.student.init_from.resolve()),
                            "weights": weights_digest(cfg.student.init_from)}
    return teacher_id, None


def resolve(cfg, teacher_config, teacher_vocab: str, labels: list | None, pad_id: int | None, seq_len: int):
    """The student's transformers config and the folder it starts from (None: a fresh initialisation), from
    `student:` (from_teacher: RUN_DIR/student_init, written later; model: a size; init_from: a folder, which must
    share the teacher's vocabulary). A classifier student (`labels`) gets the teacher's labels. ModelError."""
    from transformers import AutoConfig

    lm = labels is None
    student_init = None
    if cfg.student.from_teacher:
        layers = cfg.student.from_teacher.layers
        student_config = subset_config(teacher_config, layers, cfg.teacher)
        student_init = cfg.run_dir / "student_init"
    elif cfg.student.model:
        base = model_config(cfg.student.model, None, teacher_config.vocab_size, teacher_config.eos_token_id,
                            pad_id, seq_len)
        student_config = base if lm else classifier_config(base, labels, pad_id)
    else:
        student_init = cfg.student.init_from
        if not (student_init / "config.json").is_file():
            raise ModelError(f"student.init_from: {student_init} is not a Hugging Face model folder (no config.json)")
        if vocabulary_hash(student_init) != teacher_vocab:
            raise ModelError(f"student.init_from: {student_init} has another tokenizer than the teacher "
                             f"{cfg.teacher} (tokenizer.json differs); a student must share the teacher's")
        own = AutoConfig.from_pretrained(student_init)
        if (own.architectures or ["?"])[0].endswith("ForSequenceClassification"):
            if lm:
                raise ModelError(f"student.init_from: {student_init} is a classifier; a language model's student "
                                 "is a causal LM folder")
            if own.id2label != teacher_config.id2label:
                raise ModelError(f"student.init_from: {student_init}'s labels {own.id2label} are not the "
                                 f"teacher's {teacher_config.id2label}")
            student_config = own
        else:  # a causal LM: a classifier student gets a new head over its body
            student_config = folder_config(student_init, seq_len, "data.seq_len" if lm else "task.max_length")
            if not lm:
                student_config = classifier_config(student_config, labels, pad_id)
    return student_config, student_init
