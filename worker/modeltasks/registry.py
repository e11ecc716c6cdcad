"""Tasks that run on a resident model: the registry, `model_task`, `TaskContext` and `call_task`.

A task is a function ``fn(ctx, *args, **kwargs)`` registered under a dotted name
with ``@model_task("acme.score")``; it gets the model in ``ctx`` and returns JSON.
`call_task` is the one way a task runs: it looks the task up, sets the active
adapters the job asked for (restored afterwards), calls it, and turns its return
into checked, size-limited JSON. This module knows nothing of Redis, records or
the cache: the runner builds the context and reads the outcome.

A task that replaces the model object (wrapping a plain model into a PeftModel,
say) assigns the new one to ``ctx.model``; `call_task` reports it in
``TaskOutcome.model`` / ``.replaced``, and the caller must put that object in
its cache entry in place of the old one.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, SupportsFloat, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from schemas.errors import InvalidJob, ModelqError, ResultTooLarge, TaskFailed, TaskNotFound
from schemas.jobs import check_task_name
from worker.modeltasks import activation as task_adapters
from worker.modeltasks.io import PathResolver, no_paths, no_tokenizer, to_json

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
ProgressHook = Callable[[int, int, dict[str, float] | None], None]
TokenizerLoader = Callable[[], PreTrainedTokenizerBase]


def _no_progress(done: int, total: int, metrics: dict[str, float] | None) -> None:
    return None


def _never_cancelled() -> None:
    return None


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its name, function, whether it changes adapters on purpose, and
    whether it is batchable (takes a list as its first argument and returns a list of the
    same length, one result per item, so that queued jobs' lists can share one call)."""

    name: str
    fn: Callable[..., Any]
    changes_adapters: bool = False
    batchable: bool = False

    @property
    def description(self) -> str:
        """The first line of the task's docstring (what `modelq tasks` shows)."""
        return (inspect.getdoc(self.fn) or "").split("\n", 1)[0]


class TaskRegistry:
    """Tasks by name. `builtins` are modules imported on first lookup (they register themselves)."""

    def __init__(self, builtins: Sequence[str] = ()) -> None:
        self._tasks: dict[str, TaskSpec] = {}
        self._builtins = tuple(builtins)
        self._lock = threading.RLock()

    def task(self, name: str, *, changes_adapters: bool = False,
             batchable: bool = False) -> Callable[[F], F]:
        """Decorator: register ``fn(ctx, *args, **kwargs)`` under the dotted `name`."""
        def register(fn: F) -> F:
            self.register(name, fn, changes_adapters=changes_adapters, batchable=batchable)
            return fn
        return register

    def register(self, name: str, fn: Callable[..., Any], *, changes_adapters: bool = False,
                 batchable: bool = False) -> TaskSpec:
        check_task_name(name)
        spec = TaskSpec(name, fn, changes_adapters, batchable)
        with self._lock:
            known = self._tasks.get(name)
            if known is not None and _qualname(known.fn) != _qualname(fn):
                raise ValueError(f"task {name!r} is registered already by {_qualname(known.fn)}: "
                                 "pick another name")
            self._tasks[name] = spec  # the same function again (a module reloaded): the newer one
        return spec

    def get(self, name: str) -> TaskSpec:
        """The task named `name`; TaskNotFound says which tasks there are."""
        self._load_builtins()
        with self._lock:
            spec = self._tasks.get(name)
            if spec is None:
                raise TaskNotFound(f"no task named {name!r} on this worker (it offers "
                                   f"{', '.join(sorted(self._tasks)) or 'none'}): start the worker "
                                   "with --tasks MODULE for the module that registers it", task=name)
            return spec

    def names(self) -> tuple[str, ...]:
        self._load_builtins()
        with self._lock:
            return tuple(sorted(self._tasks))

    def _load_builtins(self) -> None:
        with self._lock:
            builtins, self._builtins = self._builtins, ()
        for module in builtins:
            importlib.import_module(module)

    def unregister(self, name: str) -> None:
        """Forget the task `name` (tests, and a module that withdraws a task)."""
        with self._lock:
            self._tasks.pop(name, None)


def _qualname(fn: Callable[..., Any]) -> str:
    """Where `fn` is defined: equal for the same function in a reloaded module."""
    line = getattr(getattr(fn, "__code__", None), "co_firstlineno", "?")
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))} (line {line})"


REGISTRY = TaskRegistry(builtins=("worker.modeltasks.builtin.generate", "worker.modeltasks.builtin.scoring",
                                  "worker.modeltasks.builtin.lora", "worker.modeltasks.builtin.train"))
"""The worker's tasks: the built-in ones, and those of modules named by --tasks."""


def model_task(name: str, *, changes_adapters: bool = False,
               batchable: bool = False) -> Callable[[F], F]:
    """Register a task on the worker: ``@model_task("acme.score") def score(ctx, texts): ...``.

    `changes_adapters`: the task adds or activates adapters on purpose, so the
    active adapters are not restored after it. `batchable`: the task takes a list as its
    first argument and returns one result per item, so queued jobs of it on one model may
    share a call (their lists joined; `ctx.row_adapters` gives each item's adapter).
    """
    return REGISTRY.task(name, changes_adapters=changes_adapters, batchable=batchable)


def import_task_modules(names: Sequence[str], registry: TaskRegistry = REGISTRY) -> tuple[str, ...]:
    """Import the user's task modules (as `celery --include` does); the task names offered after."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"cannot import task module {name!r} ({exc}): is it on the "
                              "worker's PYTHONPATH?") from exc
    return registry.names()


@dataclass
class TaskHooks:
    """What the runner lends a task: progress, cancellation, the tenant's paths, a tokenizer.

    The defaults suit a test: no progress reported, never cancelled, no local paths,
    no tokenizer.
    """

    progress: ProgressHook = _no_progress
    check_cancel: Callable[[], None] = _never_cancelled
    resolve_path: PathResolver = no_paths
    load_tokenizer: TokenizerLoader | None = None
    adapter_name: Callable[[str], str] = str  # a job's adapter name as it is on the model (tenants)
    checkpoint_dir: Path | None = None  # MODELQ_CHECKPOINT_DIR: where long tasks keep resumable state


@dataclass
class TaskContext:
    """What a task gets: the model (and its key, device, active adapters) and the runner's hooks.

    `model` may be reassigned by a task that replaces the model object (see the
    module docstring).
    """

    model: torch.nn.Module
    model_key: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    adapters: tuple[str, ...] | None = None
    """Asked for: None keeps the model's active adapters, () runs the base alone.
    While the task runs: the names active."""
    hooks: TaskHooks = field(default_factory=TaskHooks)
    base_model: str | None = None
    """The base as its user names it (repo id or folder): what a saved adapter names."""
    row_adapters: tuple[str, ...] | None = None
    """In a batch of several jobs: each item's adapter as named on the model ("__base__" for
    none), for peft's mixed-adapter inference (`adapter_names=`). None: every item runs with
    `adapters`."""
    row_jobs: tuple[int, ...] | None = None
    """In a call shared by several jobs: each item's job (0, 1, ... in the joined list), so
    that what a task counts per job (seeded sampling's equal prompts) is counted within the
    item's own job. None: the items are one job's."""
    job_id: str | None = None
    """The run job's id (None in process): what keys a task's state that outlives an attempt,
    such as training checkpoints, so the job's next attempt on any worker finds it."""
    tenant: str | None = None
    """The job's tenant (None: single-tenant), for folders scoped per tenant."""
    _tokenizer: PreTrainedTokenizerBase | None = field(default=None, init=False, repr=False)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer, loaded on first use (the runner caches it per model)."""
        if self._tokenizer is None:
            if self.hooks.load_tokenizer is None:
                raise no_tokenizer(self.model_key)
            self._tokenizer = self.hooks.load_tokenizer()
        return self._tokenizer

    def progress(self, done: int, total: int, metrics: Mapping[str, SupportsFloat] | None = None) -> None:
        """Report `done` of `total` steps, with per-step numbers such as {"loss": 2.3}."""
        numbers = None if metrics is None else {key: float(value) for key, value in metrics.items()}
        self.hooks.progress(done, total, numbers)

    def check_cancel(self) -> None:
        """Raise Cancelled or TimedOut if the job was cancelled or ran out of time; call it often."""
        self.hooks.check_cancel()

    def adapter_name(self, name: str) -> str:
        """The adapter `name` of the job as it is named on the model (namespaced per tenant in a
        multi-tenant pool); tasks that take adapter names look them up through this."""
        return self.hooks.adapter_name(name)

    def resolve_path(self, path: str | Path, *, for_writing: bool = False) -> Path:
        """`path` as the worker may use it; AccessDenied outside the tenant's roots."""
        return self.hooks.resolve_path(path, for_writing=for_writing)


@dataclass(frozen=True)
class TaskOutcome:
    """What a task returned (checked JSON, its size) and the model after it (maybe replaced)."""

    value: Any
    size: int  # bytes of `value` as compact JSON
    model: torch.nn.Module
    replaced: bool  # the task put a new model object in ctx.model: the cache must hold it


def call_task(ctx: TaskContext, name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
              max_result_bytes: int, *, registry: TaskRegistry = REGISTRY) -> TaskOutcome:
    """Run the task `name` on `ctx.model` with `ctx.adapters` active; its JSON result.

    Raises TaskNotFound, InvalidJob (arguments the task does not take, adapters the
    model lacks), TaskFailed (the task raised, or returned something not JSON) and
    ResultTooLarge. A ModelqError raised inside the task (Cancelled, TimedOut,
    AccessDenied, ...) passes through as it is.
    """
    spec = registry.get(name)
    bound = _bind(spec, ctx, args, kwargs)
    original = ctx.model
    with _activated(ctx, restore=not spec.changes_adapters):
        try:
            raw = spec.fn(*bound.args, **bound.kwargs)
        except ModelqError:
            raise
        except Exception as exc:
            log.error("task %s failed on model %s", name, ctx.model_key, exc_info=True)
            raise TaskFailed(f"task {name} raised {type(exc).__name__}: {_first_line(exc)}", task=name,
                             exception_type=type(exc).__name__, exception_message=_first_line(exc)) from exc
    value = to_json(raw, task=name)
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > max_result_bytes:
        raise ResultTooLarge(f"task {name} returned {size} bytes of JSON, over the limit of "
                             f"{max_result_bytes}: write large outputs to a file and return its path",
                             task=name, size=size, limit=max_result_bytes)
    return TaskOutcome(value, size, ctx.model, ctx.model is not original)


def _bind(spec: TaskSpec, ctx: TaskContext, args: Sequence[Any],
          kwargs: Mapping[str, Any]) -> inspect.BoundArguments:
    signature = inspect.signature(spec.fn)
    try:
        return signature.bind(ctx, *args, **kwargs)
    except TypeError as exc:
        params = list(signature.parameters.values())[1:]
        shown = f"({', '.join(str(p) for p in params)})"
        raise InvalidJob(f"task {spec.name} does not take these arguments ({exc}): it takes {shown}",
                         task=spec.name) from None


@contextmanager
def _activated(ctx: TaskContext, *, restore: bool) -> Iterator[None]:
    """The job's adapters active during the call; the model's own put back after (if `restore`)."""
    before = task_adapters.adapter_state(ctx.model)
    if ctx.adapters is not None:
        ctx.adapters = task_adapters.set_active(ctx.model, ctx.adapters)
    elif before is not None:
        ctx.adapters = before.active if before.enabled else ()
    else:
        ctx.adapters = ()
    try:
        yield
    finally:
        if restore:
            task_adapters.restore(ctx.model, before)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__
