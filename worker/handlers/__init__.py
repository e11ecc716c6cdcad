"""Job kinds as handlers: one table from a job's kind to what runs it on a worker.

A new kind is one new `Handler` subclass and one entry in `handler_table`. The runner
(worker/jobs/runner.py) looks the handler up by `job.kind` and asks it what it needs around
the run: the stage the job opens with, the ref that errors name, its timeout, the routing
claims its final record drops, and a cache answer that lets it skip the full run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from schemas import LoadJob, ModelInfo, RunResult, Stage
from tasks.state.model_specs import ModelSpecs
from worker.jobs.progress import Reporter
from worker.models.admission import Admission
from worker.models.cache import ModelCache
from worker.models.residents import Residents

MAX_RESULT_BYTES = 1 << 20
"""A run job's result, as JSON, is at most this many bytes (Settings.max_result_bytes)."""

Claim = tuple[str, str]
"""(key, value): a routing claim a job's final record deletes while it still holds value."""


class Handler:
    """What one job kind does on a worker; subclasses implement `run` and override the rest."""

    def run(self, job: Any, reporter: Reporter) -> ModelInfo | RunResult:
        """Do the job; its result goes into the succeeded record."""
        raise NotImplementedError

    def opening(self, job: Any) -> tuple[Stage, str] | None:
        """The stage (and message) the job starts in, written with its start."""
        return None

    def ref(self, job: Any) -> str:
        """What error messages name (the model or adapter the job is about)."""
        return ""

    def timeout(self, job: Any) -> float | None:
        """The job's own time limit (None: the worker's default)."""
        return None

    def claims(self, job: Any) -> list[Claim]:
        """Routing claims that this job's final record drops."""
        return []

    def cached(self, job: Any) -> ModelInfo | RunResult | None:
        """The result when the cache already serves the job as asked (one write, no run)."""
        return None

    def served(self, result: ModelInfo | RunResult) -> None:
        """A job was served from `cached`'s answer."""


def handler_table(residents: Residents, admission: Admission, *,
                  claim: Callable[[LoadJob], Claim] | None = None,
                  max_result_bytes: int = MAX_RESULT_BYTES, specs: ModelSpecs | None = None,
                  max_run_seconds: float | None = None,
                  checkpoint_dir: Path | None = None) -> Mapping[str, Handler]:
    """The handlers of a worker, by job kind. `specs`: load specs by model key, so that run
    jobs on a key whose worker died load it again (None: no Redis, as in `local_handlers`);
    `max_run_seconds`: a run job's time limit when it names none (None: no limit);
    `checkpoint_dir`: MODELQ_CHECKPOINT_DIR, for tasks that checkpoint."""
    from worker.handlers.attach import AttachHandler, UnloadHandler
    from worker.handlers.load import LoadHandler
    from worker.handlers.respawn import Respawn
    from worker.handlers.run import RunHandler

    load = LoadHandler(residents, admission, claim, specs=specs)
    respawn = Respawn(specs, load) if specs is not None else None
    return {"load": load, "attach": AttachHandler(residents, specs),
            "unload": UnloadHandler(residents, specs),
            "run": RunHandler(residents, load, max_result_bytes=max_result_bytes, respawn=respawn,
                              max_run_seconds=max_run_seconds, checkpoint_dir=checkpoint_dir)}


def local_handlers(cache: ModelCache, *, name: str = "local", device: str = "cpu") -> Mapping[str, Handler]:
    """A single-tenant worker's handlers over `cache`, for use in this process (benchmarks,
    tests, notebooks): no Redis, no routing claims."""
    from tasks.tenants import load_tenants
    from worker.device import WorkerIdentity
    from worker.policy import TenantPolicy

    residents = Residents(cache, WorkerIdentity(name=name, device=device, local_device=device),
                          TenantPolicy(load_tenants(None)))
    return handler_table(residents, Admission(cache, device))
