"""Run jobs that share one call of a batchable task: what may share, and each job's own end.

The cross-job batcher (worker/jobs/batching.py) hands `RunBatches.run_batch` the started
jobs whose `batch_key` is equal: the same batchable task, the same model (the same model
key, or a load spec this worker's cache has served as that key, or else the same load spec)
and equal arguments but the items. Each job is first checked
as alone (its model found or loaded, its tenant's access, its adapters); one that fails
there fails alone. The rest run in groups, one call each:

- rows whose adapters peft can mix (LoRA, no DoRA, nothing merged, eval mode; "__base__"
  for none) share one call, each row's adapter in `ctx.row_adapters`;
- a job on an adapter peft can't mix, or on several adapters at once, runs with the
  jobs on exactly the same adapters, activated for the call as alone.

Adapter names are the tenant's own (namespaced on the model, worker/policy.py): a job
that leaves its adapters as the model stands gets only the active adapters its tenant
may see. A job cancelled or out of time during a shared call ends so, and the call runs
again without it; any other error of a shared call runs its jobs one by one, so that the
error lands on the job that caused it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from peft import PeftModel

from schemas import InvalidJob, ModelInfo, RunJob, RunResult, Stage
from schemas.errors import ModelqError
from tasks.state.registry import request_key
from worker.handlers.run import RunHandler, _device, _tokenizer, info_as_used, own_active, path_resolver
from worker.jobs.batching import Member, StopCheck
from worker.models.cache import Entry
from worker.modeltasks.activation import adapter_state
from worker.modeltasks.io import no_paths
from worker.modeltasks.joining import BASE, Split, joined_arguments, mixable, split_args, split_values
from worker.modeltasks.registry import TaskContext, TaskHooks, call_task

log = logging.getLogger(__name__)


@dataclass
class Row:
    """A job of the batch, checked and ready: its model entry, adapters and items."""

    member: Member
    job: RunJob
    entry: Entry
    cache_hit: bool
    wanted: tuple[str, ...]  # the adapters it runs with, as named on the model
    row: str | None  # its one adapter for a mixed call ("__base__": none); None: can't mix
    split: Split


class RunBatches:
    """The run handler's side of cross-job batches (worker/jobs/batching.py `BatchHandler`)."""

    def __init__(self, run: RunHandler) -> None:
        self.run = run

    def batch_key(self, job: object) -> Hashable | None:
        if not isinstance(job, RunJob):
            return None
        try:
            spec = self.run.registry.get(job.task)
        except ModelqError:
            return None
        if not spec.batchable or spec.changes_adapters:
            return None
        split = split_args(spec, job.args, job.kwargs)
        if split is None:
            return None
        return job.task, self._model_of(job), split.key

    def _model_of(self, job: RunJob) -> str:
        """The model a job runs on, as far as this worker can tell before preparing it: a load
        spec its cache has already served counts as that entry's key, so that jobs naming the
        key and jobs naming the spec share a call. A hint only: each job's own load still runs
        in `_prepare`, and rows are grouped by the entry they got there."""
        if job.model.load is None:
            return f"key:{job.model.model_key}"
        wanted = request_key(job.model.load)
        for entry in self.run.residents.cache.entries():
            if wanted in entry.request_keys:
                return f"key:{entry.key}"
        return job.model.model_dump_json()

    def run_batch(self, members: Sequence[Member], check: StopCheck) -> int:
        rows: list[Row] = []
        for member in members:
            try:
                rows.append(self._prepare(member))
            except Exception as exc:  # fails alone, before any shared call
                member.error = exc
        cache = self.run.residents.cache
        shared = 1
        for group in self._groups(rows):
            with cache.using(group[0].entry.key):  # never evicted meanwhile; keep-alive from the end
                shared = max(shared, self._run_group(group, check))
        return shared

    def _prepare(self, member: Member) -> Row:
        job: RunJob = member.job
        spec = self.run.registry.get(job.task)
        key, cache_hit = job.model.model_key, True
        if job.model.load is not None:
            loaded = self.run.load.run(job.model.load, member.reporter)
            key, cache_hit = loaded.model_key, loaded.cache_hit
        assert key is not None
        if job.model.load is None:  # its holder may have died: loaded again from its spec
            cache_hit = self.run.find_model(key, job.tenant, member.reporter)
        entry = self.run.residents.owned(key, job.tenant)
        self.run.check_shared(job, entry, spec)
        wanted = self._wanted(entry, job)
        split = split_args(spec, job.args, job.kwargs)
        assert split is not None  # its batch_key said so
        row = BASE if not wanted else wanted[0] if len(wanted) == 1 else None
        return Row(member, job, entry, cache_hit, wanted, row, split)

    def _wanted(self, entry: Entry, job: RunJob) -> tuple[str, ...]:
        """The adapters the job runs with, as named on the model: those it names (InvalidJob
        for one its tenant has not attached), else the active ones its tenant may see."""
        policy, tenant, model = self.run.residents.policy, job.tenant, entry.model
        if job.adapters is None:
            state = adapter_state(model)
            active = state.active if state is not None and state.enabled else ()
            own = own_active(entry, tenant, policy.multi)
            return active if own is None else own
        wanted = tuple(policy.adapter_name(name, tenant) for name in job.adapters)
        attached = tuple(model.peft_config) if isinstance(model, PeftModel) else ()
        missing = [plain for plain, name in zip(job.adapters, wanted, strict=True)
                   if name not in attached]
        if missing:
            mine = policy.view(entry.info, entry, tenant).adapters
            raise InvalidJob(f"the model has no adapter named {', '.join(map(repr, missing))} "
                             f"(it has {', '.join(map(repr, mine)) or 'none'}): attach it first, "
                             "or leave 'adapters' out", adapters=missing)
        return wanted

    def _groups(self, rows: list[Row]) -> list[list[Row]]:
        """Rows that share a call: mixable rows of one model together, the rest by adapters."""
        groups: dict[tuple[object, ...], list[Row]] = {}
        can_mix: dict[str, frozenset[str]] = {}
        for row in rows:
            key = row.entry.key
            mix = can_mix.setdefault(key, mixable(row.entry.model))
            if row.row is not None and mix and (row.row == BASE or row.row in mix):
                groups.setdefault((key, "mixed"), []).append(row)
            else:
                row.row = None
                groups.setdefault((key, "alone", row.wanted), []).append(row)
        return list(groups.values())

    def _run_group(self, group: list[Row], check: StopCheck) -> int:
        pending = []
        for row in group:
            try:
                row.member.reporter.stage(Stage.running_task, f"running {row.job.task} on "
                                          f"{row.entry.key} in a batch of {len(group)} jobs")
                pending.append(row)
            except Exception as exc:  # cancelled or out of time already
                row.member.error = exc
        while pending:
            started = time.monotonic()
            try:
                parts, used = self._call(pending, check)
            except Exception as exc:
                stopped = [row for row in pending if row.member.stop is not None]
                if stopped:
                    for row in stopped:
                        row.member.error = row.member.stop
                    pending = [row for row in pending if row.member.stop is None]
                    continue
                if len(pending) == 1:
                    pending[0].member.error = exc
                    return 1
                log.warning("a call shared by %d jobs raised %s: running them one by one",
                            len(pending), type(exc).__name__)
                for row in pending:
                    self._run_group([row], check)
                return 1
            seconds = round(time.monotonic() - started, 4)
            for row, part, active in zip(pending, parts, used, strict=True):
                if isinstance(part, Exception):
                    row.member.error = part
                    continue
                row.member.result = RunResult(
                    model_key=row.entry.key, value=part, seconds=seconds, cache_hit=row.cache_hit,
                    model=self._info(row, active), batch_jobs=len(pending))
            return len(pending)
        return 1

    def _call(self, rows: list[Row], check: StopCheck) -> tuple[list[Any], list[tuple[str, ...]]]:
        """One call of the task for `rows`: each row's part of the result, and the adapters
        active for each row."""
        first, run = rows[0], self.run
        spec = run.registry.get(first.job.task)
        mixed = {row.row for row in rows}
        row_adapters = None
        adapters: tuple[str, ...] | None = first.wanted
        if len(rows) > 1 and len(mixed) > 1:
            adapters = tuple(sorted(str(a) for a in mixed if a != BASE))
            row_adapters = tuple(str(row.row) for row in rows for _ in row.split.items)
        ctx = TaskContext(model=first.entry.model, model_key=first.entry.key,
                          device=_device(first.entry.model), adapters=adapters,
                          hooks=self._hooks(rows, check), base_model=first.entry.base.ref,
                          row_adapters=row_adapters, row_jobs=None if len(rows) == 1 else tuple(
                              i for i, row in enumerate(rows) for _ in row.split.items))
        if len(rows) == 1:  # alone: exactly as the job asked
            outcome = call_task(ctx, first.job.task, first.job.args, first.job.kwargs,
                                run.max_result_bytes, registry=run.registry)
            parts: list[Any] = [outcome.value]
        else:
            args, kwargs = joined_arguments(spec, [row.split for row in rows])
            outcome = call_task(ctx, first.job.task, args, kwargs,
                                run.max_result_bytes * len(rows), registry=run.registry)
            parts = split_values(outcome.value, [len(row.split.items) for row in rows],
                                 task=first.job.task, max_result_bytes=run.max_result_bytes)
        if outcome.replaced:
            first.entry.model = outcome.model
        first.entry.info = run.residents.info(first.entry, True, 0.0, measure=outcome.replaced)
        if row_adapters is None:
            return parts, [tuple(ctx.adapters or ())] * len(rows)
        return parts, [() if row.row == BASE else (str(row.row),) for row in rows]

    def _hooks(self, rows: list[Row], check: StopCheck) -> TaskHooks:
        policy, run = self.run.residents.policy, self.run
        tenants = {row.job.tenant for row in rows}
        members = [row.member for row in rows]

        def progress(done: int, total: int, metrics: dict[str, float] | None) -> None:
            for member in members:
                member.reporter.progress(done, total, unit="steps", metrics=metrics)

        hooks = TaskHooks(progress=progress, check_cancel=lambda: check(members),
                          load_tokenizer=_tokenizer(rows[0].entry))
        if len(tenants) == 1:  # several tenants' rows: no paths, no adapter lookups
            tenant = next(iter(tenants))
            hooks.resolve_path = path_resolver(policy.access(tenant))
            hooks.adapter_name = lambda name: policy.adapter_name(name, tenant)
        else:
            hooks.resolve_path = no_paths
            hooks.adapter_name = _mixed_tenants
        del run
        return hooks

    def _info(self, row: Row, active: tuple[str, ...]) -> ModelInfo:
        policy = self.run.residents.policy
        return policy.view(info_as_used(row.entry.info, active), row.entry, row.job.tenant)


def _mixed_tenants(name: str) -> str:
    raise InvalidJob(f"adapter {name[:100]!r} named by a task whose call several tenants' jobs "
                     "share: a task that looks adapters up by name is not batchable")
