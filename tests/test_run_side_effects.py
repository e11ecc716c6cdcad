"""Side effects of run jobs on a resident model, in-process on the run handler: a task that
changes adapters and fails leaves the cache entry as it was before it (its model object, no
injected LoRA layers, the same parameters' requires_grad, mode, adapters and outputs), and
a user task registered with changes_adapters=True is refused on a shared base as the
built-in adapter tasks are. The tasks are a user task module (tests/support/long_tasks.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

import tests.support.long_tasks  # noqa: F401  (registers the tests.* tasks)
from schemas import AccessDenied, LoadJob, RunJob, TaskFailed, UnloadJob
from schemas.tenants import SHARED_TENANT
from tasks.tenants import load_tenants
from tests.support.tenancy import write_tenants
from worker.device import WorkerIdentity
from worker.handlers import Handler, handler_table, local_handlers
from worker.jobs.progress import Reporter
from worker.models.admission import Admission
from worker.models.cache import Entry, ModelCache
from worker.models.residents import Residents
from worker.policy import TenantPolicy

INPUT_IDS = torch.tensor([[1, 5, 17, 42, 99, 3]])
REPORTER = Reporter(lambda *_: None, lambda: False)


def _state(entry: Entry) -> dict[str, Any]:
    model = entry.model
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    return {"model": id(model), "adapters": dict(entry.adapters), "training": model.training,
            "layers": sorted(n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)),
            "grads": [p.requires_grad for p in model.parameters()],
            "peft": sorted(model.peft_config) if isinstance(model, PeftModel) else None,
            "peft_attr": hasattr(model, "peft_config"), "logits": logits}


def _run(handlers: dict[str, Handler], key: str, task: str, tenant: str = "default",
         **kwargs: Any) -> Any:
    job = RunJob.model_validate({"task": task, "model": {"model_key": key}, "tenant": tenant,
                                 "kwargs": kwargs})
    return handlers["run"].run(job, REPORTER)


def _generate(handlers: dict[str, Handler], key: str, tenant: str = "default") -> Any:
    return _run(handlers, key, "modelq.generate", tenant, prompts="the quick brown fox",
                max_new_tokens=8).value


@pytest.mark.parametrize("adapters", [(), ("lora",)], ids=["plain", "peft"])
def test_a_changes_adapters_task_that_fails_leaves_the_entry_as_it_was(
        models: dict[str, Path], adapters: tuple[str, ...]) -> None:
    cache = ModelCache(2**30)
    handlers = dict(local_handlers(cache, name="w"))
    job = LoadJob.model_validate({"model": str(models["llama"]),
                                  "adapters": [{"ref": str(models[a]), "name": "a"} for a in adapters]})
    key = handlers["load"].run(job, REPORTER).model_key
    entry = cache.peek(key)
    assert entry is not None
    before, generated = _state(entry), _generate(handlers, key)
    with pytest.raises(TaskFailed, match="failed halfway"):
        _run(handlers, key, "tests.wrap_and_fail")
    after = _state(entry)
    torch.testing.assert_close(after.pop("logits"), before.pop("logits"), rtol=0, atol=0)
    assert after == before
    assert _generate(handlers, key) == generated  # and it serves as before


def test_a_user_task_that_changes_adapters_is_refused_on_a_shared_base(
        models: dict[str, Path], tmp_path: Path) -> None:
    tenants = load_tenants(write_tenants(tmp_path / "tenants.toml", {
        "alice": {"key": "k" * 20, "roots": [str(models["llama"].parent)]}}))
    cache = ModelCache(2**30)
    residents = Residents(cache, WorkerIdentity(name="w", device="cpu", local_device="cpu"),
                          TenantPolicy(tenants))
    handlers = dict(handler_table(residents, Admission(cache, "cpu")))
    key = handlers["load"].run(LoadJob(model=str(models["llama"]), tenant="alice"),
                               REPORTER).model_key
    assert _run(handlers, key, "tests.add_lora", "alice").value == {"added": "mine"}  # its own
    handlers["unload"].run(UnloadJob(model_key=key, tenant="alice"), REPORTER)
    key = handlers["load"].run(LoadJob(model=str(models["llama"]), tenant="alice"),
                               REPORTER).model_key
    entry = cache.peek(key)
    assert entry is not None
    entry.tenant, entry.shared_by = SHARED_TENANT, {"alice"}  # as a public pinned base loads
    before, generated = _state(entry), _generate(handlers, key, "alice")
    for task in ("tests.add_lora", "tests.wrap_and_fail", "modelq.add_adapter"):
        with pytest.raises(AccessDenied, match="shared base"):
            _run(handlers, key, task, "alice")
    after = _state(entry)
    torch.testing.assert_close(after.pop("logits"), before.pop("logits"), rtol=0, atol=0)
    assert after == before
    assert _generate(handlers, key, "alice") == generated  # reading it is fine
