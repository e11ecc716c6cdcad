"""The worker's resident models, accounted in bytes against its device's capacity.

This module owns what is resident and how much room is left; freeing a model
returns its memory to the process (and the CUDA caching allocator).
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from schemas import ModelInfo, ResidentModel
from worker.resolve import Source


@dataclass
class Entry:
    """One resident model and what was attached to it."""

    key: str
    model: torch.nn.Module
    info: ModelInfo
    base: Source
    tenant: str
    bytes: int
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter identity
    pinned: bool = False
    last_used: float = field(default_factory=time.time)

    def resident(self) -> ResidentModel:
        return ResidentModel(
            model_key=self.key, base=self.base.ref, tenant=self.tenant, bytes=self.bytes,
            adapters=self.info.adapters, active_adapters=self.info.active_adapters,
            quantization=self.info.quantization, pinned=self.pinned,
            last_used=datetime.fromtimestamp(self.last_used, tz=timezone.utc))


class ModelCache:
    """Resident models by key, with their bytes counted against `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[str, Entry] = {}
        self._lock = threading.RLock()

    def get(self, key: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_used = time.time()
            return entry

    def put(self, entry: Entry) -> None:
        with self._lock:
            self._entries[entry.key] = entry

    def remove(self, key: str) -> Entry | None:
        """Drop `key` and give its memory back; the removed entry (model released)."""
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None:
            entry.model = None  # type: ignore[assignment]
            release_memory()
        return entry

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    @property
    def used(self) -> int:
        return sum(e.bytes for e in self.entries())

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used)


def release_memory() -> None:
    """Collect freed tensors and hand cached CUDA blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
