"""hypothesis-jsonschema's `from_schema`, working under the hypothesis the lock installs.

hypothesis-jsonschema 0.23.1 draws object properties with hypothesis' private
`conjecture.utils.many` through its old protocol (`while elements.more(): ...`); hypothesis
6.170 replaced that by a context manager iterated with `for _ in elements` and dropped
`more()`, so every object schema fails with "'many' object has no attribute 'more'". The
adapter below speaks the old protocol on top of the new one (entering the span on creation,
leaving it when the loop ends), and is installed only where `many` has no `more`.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import hypothesis_jsonschema._from_schema as _generator
from hypothesis.internal.conjecture import utils as _conjecture
from hypothesis_jsonschema import from_schema

__all__ = ["from_schema"]


class _ManyWithMore:
    """`many` as hypothesis-jsonschema calls it: `more()` until False, `reject()` in between."""

    def __init__(self, data: Any, **sizes: Any) -> None:
        self._many = _conjecture.many(data, **sizes)
        self._many.__enter__()
        self._elements: Iterator[None] = iter(self._many)

    def more(self) -> bool:
        if next(self._elements, False) is None:
            return True
        self._many.__exit__(None, None, None)
        return False

    def reject(self, why: str | None = None) -> None:
        self._many.reject(why)


if not hasattr(_conjecture.many, "more"):
    _patched = types.ModuleType(_conjecture.__name__)
    _patched.__dict__.update(vars(_conjecture))
    _patched.many = _ManyWithMore  # type: ignore[attr-defined]
    _generator.cu = _patched  # type: ignore[attr-defined]
