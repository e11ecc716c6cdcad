"""The shared pydantic base of every modelq contract (no torch here).

Every model is frozen, rejects unknown fields and carries the schema version it
was written with, so a producer in another language can check what it sends.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1


class Contract(BaseModel):
    """Frozen, strict-field base for all wire models."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Versioned(Contract):
    """A top-level document that is stored or sent on its own."""

    schema_version: Literal[1] = 1  # SCHEMA_VERSION
