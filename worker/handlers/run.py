"""The run handler: a named task runs on a resident model (loaded first when the job says how).

The model is the task's alone while it runs: the worker's solo pool runs one job at a
time, and the entry is marked busy so that nothing evicts it; its keep-alive counts from the
end of the job. The task's adapters are set for the call and restored after it
(worker/modeltasks/registry.py `call_task`), unless the task changes them on purpose; then the
entry learns what the model now carries, or, if the task fails, is put back as it was
(worker/handlers/rollback.py). A task that changes adapters never runs on a shared base.

A run job on a model key this worker lacks (its holder died) loads it again from the key's
spec (worker/handlers/respawn.py). A run job's time limit is its own `timeout_seconds`, else
MODELQ_MAX_RUN_SECONDS, else none (`run_limit`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import JsonValue
from transformers import PreTrainedTokenizerBase

from schemas import AccessDenied, ModelInfo, RunJob, RunResult, Stage
from schemas.tenants import SHARED_TENANT
from tasks import logs
from worker.access import Access
from worker.handlers import Claim, Handler
from worker.handlers.load import LoadHandler, check_cancel
from worker.handlers.respawn import Respawn
from worker.handlers.rollback import Before
from worker.jobs.progress import Reporter
from worker.models import adapters
from worker.models.cache import Entry
from worker.models.residents import Residents
from worker.modeltasks.activation import adapter_state
from worker.modeltasks.io import PathResolver, load_tokenizer
from worker.modeltasks.registry import REGISTRY, TaskContext, TaskHooks, TaskRegistry, TaskSpec, call_task

ADAPTER_TASKS = frozenset({"modelq.add_adapter", "modelq.train_adapter", "modelq.save_adapter"})
"""Built-in tasks that name adapters: a tenant runs them only on its own (private) models."""


class RunHandler(Handler):
    """Runs run jobs: the model found (or loaded), the task called with it in hand."""

    def __init__(self, residents: Residents, load: LoadHandler, *, max_result_bytes: int,
                 registry: TaskRegistry = REGISTRY, respawn: Respawn | None = None,
                 max_run_seconds: float | None = None, checkpoint_dir: Path | None = None) -> None:
        self.checkpoint_dir = checkpoint_dir  # MODELQ_CHECKPOINT_DIR, for tasks that checkpoint
        self.residents = residents
        self.load = load
        self.max_result_bytes = max_result_bytes
        self.registry = registry
        self.respawn = respawn  # a model key this worker lacks, loaded again from its spec
        self.max_run_seconds = max_run_seconds  # MODELQ_MAX_RUN_SECONDS: None, no limit

    def opening(self, job: RunJob) -> tuple[Stage, str]:
        if job.model.load is not None:
            return self.load.opening(job.model.load)
        return Stage.running_task, f"running {job.task}"

    def ref(self, job: RunJob) -> str:
        return job.model.load.model.display if job.model.load is not None else job.task

    def timeout(self, job: RunJob) -> float | None:
        return run_limit(job, self.max_run_seconds)

    def claims(self, job: RunJob) -> list[Claim]:
        return self.load.claims(job.model.load) if job.model.load is not None else []

    def run(self, job: RunJob, reporter: Reporter) -> RunResult:
        spec = self.registry.get(job.task)  # TaskNotFound before anything is loaded
        started = time.monotonic()
        key, cache_hit = job.model.model_key, True
        if job.model.load is not None:
            loaded = self.load.run(job.model.load, reporter)
            key, cache_hit = loaded.model_key, loaded.cache_hit
        assert key is not None
        with self.residents.cache.using(key):  # never evicted meanwhile; keep-alive from the end
            if job.model.load is None:
                cache_hit = self.find_model(key, job.tenant, reporter)
            entry = self.residents.owned(key, job.tenant)
            self.check_shared(job, entry, spec)
            value, info = self._call(job, entry, reporter)
        return RunResult(model_key=key, value=value, seconds=round(time.monotonic() - started, 4),
                         cache_hit=cache_hit, model=info)

    def find_model(self, key: str, tenant: str, reporter: Reporter) -> bool:
        """Whether model `key` was resident here; when it is not, it is loaded again from its
        spec if one is kept that `tenant` may use (its holder died, or it was evicted)."""
        cache = self.residents.cache
        if self.respawn is None:
            return True
        if cache.peek(key) is not None:
            self.respawn.resident(key)
            return True
        reloaded = self.respawn.reload(key, tenant, reporter)
        cache.busy = key  # the load let go of it as it ended: this job holds it again
        return not reloaded

    def _call(self, job: RunJob, entry: Entry, reporter: Reporter) -> tuple[JsonValue, ModelInfo]:
        policy, tenant = self.residents.policy, job.tenant
        reporter.stage(Stage.running_task, f"running {job.task} on {entry.key}")
        wanted = own_active(entry, tenant, policy.multi) if job.adapters is None else tuple(
            policy.adapter_name(a, tenant) for a in job.adapters)
        ctx = TaskContext(model=entry.model, model_key=entry.key, device=_device(entry.model),
                          adapters=wanted, hooks=TaskHooks(
                              progress=lambda done, total, metrics: reporter.progress(
                                  done, total, unit="steps", metrics=metrics),
                              check_cancel=lambda: check_cancel(reporter),
                              resolve_path=path_resolver(policy.access(tenant)),
                              load_tokenizer=_tokenizer(entry),
                              adapter_name=lambda name: policy.adapter_name(name, tenant),
                              checkpoint_dir=self.checkpoint_dir),
                          base_model=entry.base.ref, job_id=logs.context().get("job_id"), tenant=tenant)
        changes = self.registry.get(job.task).changes_adapters
        before = Before.take(entry) if changes else None
        try:
            outcome = call_task(ctx, job.task, job.args, job.kwargs, self.max_result_bytes,
                                registry=self.registry)
        except BaseException:
            if before is not None:  # not left holding half-injected adapter layers
                before.restore(entry)
            raise
        changed = outcome.replaced or changes
        if outcome.replaced:
            entry.model = outcome.model
        if changed:
            _learn_adapters(entry)
        entry.info = self.residents.info(entry, True, 0.0, measure=changed)
        used = entry.info if changed else info_as_used(entry.info, ctx.adapters or ())
        return outcome.value, policy.view(used, entry, tenant)

    def check_shared(self, job: RunJob, entry: Entry, spec: TaskSpec) -> None:
        """A shared base is never changed by a task: the built-in adapter tasks and any task
        registered with changes_adapters=True are refused there."""
        if entry.tenant == SHARED_TENANT and (job.task in ADAPTER_TASKS or spec.changes_adapters):
            raise AccessDenied(f"{job.task} adds, trains or saves adapters, which a shared base "
                               f"({entry.base.ref}) does not allow: load a private copy (a local "
                               "folder, or the repo without a pinned commit)", task=job.task)


def run_limit(job: RunJob, max_run_seconds: float | None) -> float:
    """The time limit a run job runs under: its own `timeout_seconds`, else the worker's
    MODELQ_MAX_RUN_SECONDS, else none (infinity). Never the load limit: a training run may
    take days."""
    return job.timeout_seconds or max_run_seconds or math.inf


def own_active(entry: Entry, tenant: str, multi: bool) -> tuple[str, ...] | None:
    """The adapters a job that names none runs with: the model's active ones (None: as the
    model stands), less any the job's tenant may not see (another tenant's, on a shared base)."""
    state = adapter_state(entry.model)
    if not multi or state is None:
        return None
    active = state.active if state.enabled else ()
    return tuple(name for name in active if sees(entry, name, tenant, multi))


def sees(entry: Entry, name: str, tenant: str, multi: bool) -> bool:
    """Whether `tenant` may run on the adapter `name` (as named on the model)."""
    if not multi:
        return True
    return name.endswith(f"@{tenant}") or (entry.tenant != SHARED_TENANT and "@" not in name)


def info_as_used(info: ModelInfo, active: tuple[str, ...]) -> ModelInfo:
    """`info` with the adapters that were active for a task's call (the model's own
    activation is put back after it, so `info` shows that one)."""
    return info.model_copy(update={"active_adapters": tuple(active)})


def path_resolver(access: Access) -> PathResolver:
    """The tenant's path rule for tasks: a real path, AccessDenied outside its roots."""
    def resolve(path: str | Path, *, for_writing: bool) -> Path:
        real = Path(os.path.realpath(os.path.expanduser(str(path))))
        access.check_path(str(path)[:200], real)
        return real
    return resolve


def _tokenizer(entry: Entry) -> Callable[[], PreTrainedTokenizerBase]:
    """Loads the base's tokenizer once and keeps it with the cache entry."""
    def load() -> PreTrainedTokenizerBase:
        if entry.tokenizer is None:
            entry.tokenizer = load_tokenizer(entry.base.path, entry.key)
        tokenizer: PreTrainedTokenizerBase = entry.tokenizer
        return tokenizer
    return load


def _learn_adapters(entry: Entry) -> None:
    """After a task that changes adapters: the entry lists what the model now carries (an
    adapter made by a task has no source; its identity says so)."""
    attached, _active = adapters.names(entry.model)
    for name in attached:
        entry.adapters.setdefault(name, f"task:{name}")
    for name in [n for n in entry.adapters if n not in attached]:
        entry.adapters.pop(name)


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
