"""The worker's resident models, accounted in bytes against its device's capacity.

This module owns what is resident and how much room is left: least-recently-used
eviction of unpinned idle models to make room, keep-alive expiry, and freeing a
model so that its memory really returns to the process and the OS (gc, the CUDA
caching allocator, glibc's malloc_trim). It does not load models or talk to Redis.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from schemas import InsufficientMemory, ModelInfo, ResidentModel
from worker.models.resolve import Source

log = logging.getLogger(__name__)

Clock = Callable[[], float]


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
    keep_alive: float | None = None  # seconds unused before the worker unloads it
    shared_by: set[str] = field(default_factory=set)  # tenants using a shared base (tenant '*')
    last_used: float = field(default_factory=time.time)
    request_keys: set[str] = field(default_factory=set)
    tokenizer: Any = None  # the base's tokenizer, loaded when a task first asks for it
    placement: Any = None  # the PlacementSpec its load placed it by (a strategy as its map)

    def expired(self, now: float) -> bool:
        return not self.pinned and self.keep_alive is not None and now - self.last_used >= self.keep_alive

    def resident(self) -> ResidentModel:
        return ResidentModel(
            model_key=self.key, base=self.base.ref, tenant=self.tenant, bytes=self.bytes,
            adapters=self.info.adapters, active_adapters=self.info.active_adapters,
            quantization=self.info.quantization, pinned=self.pinned,
            keep_alive_seconds=self.keep_alive, request_keys=tuple(sorted(self.request_keys)),
            shared_by=tuple(sorted(self.shared_by)),
            last_used=datetime.fromtimestamp(self.last_used, tz=UTC))


class ModelCache:
    """Resident models by key, with their bytes counted against `capacity`."""

    def __init__(self, capacity: int, clock: Clock = time.time,
                 on_evict: Callable[[int], None] | None = None) -> None:
        self.capacity = capacity
        self.clock = clock
        self.busy: str | None = None  # the key the running job works on: never evicted
        self.on_evict = on_evict or (lambda count: None)  # told how many models were evicted
        self._entries: dict[str, Entry] = {}
        self._lock = threading.RLock()

    def get(self, key: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_used = self.clock()
            return entry

    def peek(self, key: str) -> Entry | None:
        """The entry for `key`, not counted as a use."""
        with self._lock:
            return self._entries.get(key)

    def put(self, entry: Entry) -> None:
        with self._lock:
            entry.last_used = self.clock()
            self._entries[entry.key] = entry

    def remove(self, key: str) -> Entry | None:
        """Drop `key` and give its memory back; the removed entry (model released)."""
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None:
            entry.model = None  # type: ignore[assignment]
            release_memory()
        return entry

    @contextmanager
    def using(self, key: str) -> Iterator[None]:
        """`key` is the running job's model meanwhile: never evicted or expired, and its
        keep-alive counts from the end of the job (a run longer than the keep-alive does not
        see its model unloaded a moment after it ends)."""
        with self._lock:
            self.busy = key
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_used = self.clock()
        try:
            yield
        finally:
            with self._lock:
                if self.busy == key:
                    self.busy = None
                entry = self._entries.get(key)
                if entry is not None:
                    entry.last_used = self.clock()

    def _evict_if(self, key: str, still: Callable[[Entry], bool]) -> bool:
        """Remove `key` if, checked again under the lock, it is idle, unpinned and `still`
        holds: a job may have taken it (or used it) since a snapshot said it could go."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.pinned or key == self.busy or not still(entry):
                return False
            self._entries.pop(key)
        entry.model = None  # type: ignore[assignment]
        release_memory()
        return True

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    @property
    def used(self) -> int:
        return sum(e.bytes for e in self.entries())

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used)

    def evictable(self) -> list[Entry]:
        """Unpinned idle entries, least recently used first."""
        with self._lock:
            idle = [e for e in self._entries.values() if not e.pinned and e.key != self.busy]
        return sorted(idle, key=lambda e: e.last_used)

    def make_room(self, needed: int, *, what: str = "the model") -> list[str]:
        """Evict least-recently-used idle models until `needed` bytes are free; the evicted keys.

        InsufficientMemory (nothing evicted) when even evicting every idle model is not enough.
        """
        with self._lock:
            if needed <= self.free:
                return []
            reclaimable = sum(e.bytes for e in self.evictable())
            if needed > self.free + reclaimable:
                pinned = sum(e.bytes for e in self._entries.values() if e.pinned)
                raise InsufficientMemory(
                    f"{what} needs {_mib(needed)}, but this worker has {_mib(self.free)} free of "
                    f"{_mib(self.capacity)} and can evict only {_mib(reclaimable)} ({_mib(pinned)} "
                    "pinned): unload or unpin models, pick a smaller quantization, or use a "
                    "worker with more capacity", needed_bytes=needed, free_bytes=self.free,
                    capacity_bytes=self.capacity, evictable_bytes=reclaimable)
            evicted: list[str] = []
            for entry in self.evictable():
                if needed <= self.free:
                    break
                log.info("evicting %s (%d bytes, idle since %.0f) to make room for %s", entry.key,
                         entry.bytes, entry.last_used, what)
                self.remove(entry.key)
                evicted.append(entry.key)
            self.on_evict(len(evicted))
            return evicted

    def evict_idle(self) -> list[str]:
        """Evict every unpinned idle model (after an out-of-memory error)."""
        keys = [e.key for e in self.evictable() if self._evict_if(e.key, lambda e: True)]
        self.on_evict(len(keys))
        return keys

    def expire(self) -> list[str]:
        """Unload every idle model whose keep-alive has passed; the keys unloaded. Each is
        checked again under the lock as it goes (busy, pinned, used since), not from the
        snapshot that found it."""
        unloaded = []
        for entry in self.evictable():
            if entry.expired(self.clock()) and self._evict_if(
                    entry.key, lambda e: e.expired(self.clock())):
                log.info("keep-alive of %s passed: unloaded it", entry.key)
                unloaded.append(entry.key)
        return unloaded


class KeepAliveTimer:
    """A daemon thread that expires keep-alives every `interval` seconds and says when it did."""

    def __init__(self, cache: ModelCache, on_change: Callable[[], None], interval: float = 1.0) -> None:
        self.cache = cache
        self.on_change = on_change
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modelq-keep-alive", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.cache.expire():
                    self.on_change()
            except Exception:  # the timer must outlive a bad entry
                log.exception("keep-alive expiry failed")


def release_memory() -> None:
    """Collect freed tensors, hand cached CUDA blocks back, and return free heap to the OS."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
