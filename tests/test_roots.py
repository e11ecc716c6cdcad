"""MODELQ_ROOTS: a single-tenant worker loads local folders only from under its roots, and its
errors never tell whether a path outside them exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from schemas import AccessDenied, JobStatus, LoadJob
from tasks.client import Client
from tasks.settings import Settings
from tasks.tenants import single_tenant
from tests.support.tenancy import copy_into
from tests.support.workers import WorkerPool
from worker.handlers.run import path_resolver
from worker.policy import TenantPolicy


def test_roots_setting_parses_like_task_modules() -> None:
    assert Settings(roots="/a, /b").roots == ("/a", "/b")  # type: ignore[arg-type]
    assert Settings(roots='["/a", "/b,c"]').roots == ("/a", "/b,c")  # type: ignore[arg-type]
    assert Settings().roots == ()


def test_run_tasks_resolve_paths_under_the_same_roots(tmp_path: Path) -> None:
    inside = tmp_path / "roots" / "data"
    inside.mkdir(parents=True)
    resolve = path_resolver(TenantPolicy(single_tenant(), (str(tmp_path / "roots"),)).access("default"))
    assert resolve(str(inside / "train.jsonl"), for_writing=False) == inside / "train.jsonl"
    with pytest.raises(AccessDenied, match="outside the worker's roots .MODELQ_ROOTS."):
        resolve("/etc/passwd", for_writing=False)
    open_resolve = path_resolver(TenantPolicy(single_tenant()).access("default"))
    assert open_resolve("/etc/passwd", for_writing=False) == Path("/etc/passwd")  # unset: any path


@pytest.mark.e2e
def test_single_tenant_worker_keeps_to_its_roots(client: Client, pool: WorkerPool,
                                                 models: dict[str, Path], tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    model = copy_into(models["llama"], roots / "llama")
    (roots / "escape").symlink_to(models["llama"])  # inside by name, outside once resolved
    pool.start("rooted", env={"MODELQ_ROOTS": str(roots)})
    ok = client.submit(LoadJob(model=str(model))).wait(timeout=120)
    assert ok.status is JobStatus.succeeded, ok.error

    outside = ["/etc", "/etc/passwd", "/no/such/folder", "~root/.ssh", "./../../../../etc",
               str(roots / ".." / "roots-not"), str(roots / "escape"), str(models["llama"])]
    messages = set()
    for path in outside:
        record = client.submit(LoadJob(model=path)).wait(timeout=60)
        assert record.status is JobStatus.failed and record.error is not None, path
        assert record.error.type == "AccessDenied", (path, record.error)
        messages.add(record.error.message.replace(path, "PATH"))
    # one message for all of them, existing or not: nothing tells what lies outside the roots
    assert len(messages) == 1, messages
    assert "outside the worker's roots (MODELQ_ROOTS)" in messages.pop()

    missing = client.submit(LoadJob(model=str(roots / "absent"))).wait(timeout=60)
    assert missing.error is not None and missing.error.type == "ModelNotFound"
    assert missing.error.message.startswith(f"{roots / 'absent'} is not a model folder")
    assert os.path.exists("/etc")  # the refusals above were of a path that does exist
