"""What one job may read and fetch: its tenant's roots, pickle weights, its hub token.

An `Access` is built by the tenant policy (worker/policy.py) for each job and handed
down to resolution and loading (worker/resolve.py, worker/loader.py) as an argument:
no ambient state says whose job is running. `OPEN` is a single-tenant worker's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import AccessDenied
from schemas.tenants import DEFAULT_TENANT


@dataclass(frozen=True)
class Access:
    """The rules for one job's files and hub calls."""

    tenant: str = DEFAULT_TENANT
    roots: tuple[Path, ...] | None = None  # real paths a local folder must lie under; None: any
    allow_pickle: bool = False  # pickle-only checkpoints may be loaded
    token: str | bool | None = None  # hub token; False: send none; None: huggingface_hub's default

    def check_path(self, given: str, real: Path) -> None:
        """AccessDenied unless `real` (a realpath) lies under one of the roots."""
        if self.roots is None:
            return
        for root in self.roots:
            if real == root or real.is_relative_to(root):
                return
        raise AccessDenied(f"tenant {self.tenant!r} may not load from {given}: it resolves "
                           "outside the tenant's roots; put the model under one of them (ask the "
                           "operator for the roots in the tenants file)", tenant=self.tenant)


OPEN = Access()
"""A single-tenant worker's access: any folder, safetensors only, huggingface_hub's own token."""


def real_roots(roots: tuple[str, ...] | list[str]) -> tuple[Path, ...]:
    """Configured roots as real paths (`~` expanded, links followed)."""
    return tuple(Path(os.path.realpath(os.path.expanduser(root))) for root in roots)
