"""The base class of every config schema: strict, documented, and hashable."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict

DIGEST_VERSION = 2  # bumped when a default changes what a stage writes (1: every value hashed, defaults too)


class StrictModel(BaseModel):
    """A config section. Unknown keys are errors; each field's docstring becomes its `--help` line."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        # `name=123` on the command line parses as an int; a str field should still take it.
        coerce_numbers_to_str=True,
        validate_default=True,
    )

    def digest(self, exclude: set[str] | dict | None = None) -> str:
        """A short, stable hash of the resolved values (for lineage and resume checks). Values equal to their
        field's default are left out, so a field a newer lmforge adds (at a default that keeps today's behaviour)
        does not make every existing output "a different config". The other side of it: a default that changes
        what a stage writes must come with a new DIGEST_VERSION."""
        values = _pruned(self.model_dump(mode="json", exclude=exclude, exclude_defaults=True))
        blob = json.dumps(values, sort_keys=True)
        return hashlib.sha256(f"{DIGEST_VERSION}\n{blob}".encode()).hexdigest()[:16]


def _pruned(values: dict) -> dict:
    """Without sections left empty: a section whose only non-default value was excluded is no section at all."""
    out = {}
    for key, value in values.items():
        value = _pruned(value) if isinstance(value, dict) else value
        if value != {}:
            out[key] = value
    return out


# What changes how a training run is watched, paced, paused or kept, never the model it ends with: a pipeline does
# not rerun a finished stage for these (its W&B tags, its log interval). max_steps is compared on its own, with the
# steps the run trained: a longer run trains on from where the finished one stopped.
RUN_ONLY = {"tracking": True,
            "train": {"max_steps", "log_every", "save_every", "keep_last", "keep_every", "max_time", "lease_timeout",
                      "max_bad_steps"},
            "engine": {"collective_timeout", "peak_flops"}}


def result_digest(config: StrictModel) -> str:
    """The digest of a training stage's config minus RUN_ONLY: equal digests, equal models (recorded in lineage.json)."""
    return config.digest(exclude=RUN_ONLY)
