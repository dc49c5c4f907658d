"""The base class of every config schema: strict, documented, and hashable."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section. Unknown keys are errors; each field's docstring becomes its `--help` line."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        # `name=123` on the command line parses as an int; a str field should still take it.
        coerce_numbers_to_str=True,
        validate_default=True,
    )

    def digest(self, exclude: set[str] | None = None) -> str:
        """A short, stable hash of the resolved values (for lineage and resume checks)."""
        blob = json.dumps(self.model_dump(mode="json", exclude=exclude), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
