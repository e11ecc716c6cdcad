"""modelq producer side: Celery app, client, CLI and the Redis layout (no torch here).

`from tasks import Client` is lazy so that `modelq status` starts quickly.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Client", "JobHandle", "Settings"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "JobHandle"):
        from tasks import client

        return getattr(client, name)
    if name == "Settings":
        from tasks.settings import Settings

        return Settings
    raise AttributeError(name)
