"""What one job may read and fetch: its tenant's roots, pickle weights, its hub token.

An `Access` is built by the tenant policy (worker/policy.py) for each job and handed
down to resolution and loading (worker/models/resolve.py, worker/models/loader.py) and to run tasks'
path resolver as an argument: no ambient state says whose job is running. A
single-tenant worker's is `rooted(MODELQ_ROOTS)`: `OPEN` when that is unset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import AccessDenied
from schemas.tenants import DEFAULT_TENANT

TENANTS_FILE = "the tenants file"
ROOTS_SETTING = "MODELQ_ROOTS"


@dataclass(frozen=True)
class Access:
    """The rules for one job's files and hub calls."""

    tenant: str = DEFAULT_TENANT
    roots: tuple[Path, ...] | None = None  # real paths a local folder must lie under; None: any
    allow_pickle: bool = False  # pickle-only checkpoints may be loaded
    token: str | bool | None = None  # hub token; False: send none; None: huggingface_hub's default
    roots_from: str = TENANTS_FILE  # where the roots are set, named in the error

    def check_path(self, given: str, real: Path) -> None:
        """AccessDenied unless `real` (a realpath) lies under one of the roots.

        Called before anything at the path is read, and the message names only what was
        given: an existing path and a missing one outside the roots read the same."""
        if self.roots is None:
            return
        for root in self.roots:
            if real == root or real.is_relative_to(root):
                return
        if self.roots_from == TENANTS_FILE:
            raise AccessDenied(f"tenant {self.tenant!r} may not load from {given}: it resolves "
                               "outside the tenant's roots; put the model under one of them (ask "
                               "the operator for the roots in the tenants file)", tenant=self.tenant)
        raise AccessDenied(f"this worker may not load from {given}: it resolves outside the "
                           f"worker's roots ({self.roots_from}); put the model under one of them "
                           f"(ask the operator for {self.roots_from})", tenant=self.tenant)


OPEN = Access()
"""A single-tenant worker's access without MODELQ_ROOTS: any folder, safetensors only,
huggingface_hub's own token."""


def rooted(roots: tuple[str, ...] | list[str]) -> Access:
    """A single-tenant worker's access: under `roots` (MODELQ_ROOTS) when set, else OPEN."""
    return Access(roots=real_roots(roots), roots_from=ROOTS_SETTING) if roots else OPEN


def real_roots(roots: tuple[str, ...] | list[str]) -> tuple[Path, ...]:
    """Configured roots as real paths (`~` expanded, links followed)."""
    return tuple(Path(os.path.realpath(os.path.expanduser(root))) for root in roots)
