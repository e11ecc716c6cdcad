"""`modelq gateway`, the HTTP API (needs the `gateway` extra; no torch): `api.py` builds the
FastAPI app and its routes, `http.py` is its edge (the error shape, bounded bodies),
`events.py` its event streams, `openapi.py` its OpenAPI document.

`from tasks.gateway import create_gateway` works as it did before this was a package; FastAPI
is imported only then.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_gateway"]


def __getattr__(name: str) -> Any:
    if name == "create_gateway":
        from tasks.gateway.api import create_gateway

        return create_gateway
    raise AttributeError(name)
