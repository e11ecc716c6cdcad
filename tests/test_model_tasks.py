"""worker/modeltasks/registry.py: registering and calling tasks in process (no Redis): lookup, arguments,
JSON results and their limit, errors wrapped or passed through, adapters activated for a call
and put back, the hooks a task gets (tokenizer, paths, progress, cancel)."""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from schemas import AccessDenied, Cancelled, InvalidJob, ResultTooLarge, TaskFailed, TaskNotFound, TimedOut
from schemas.errors import UnsupportedModel
from tests.support.models import build_lora, build_model
from worker import TaskContext, model_task
from worker.modeltasks.io import TokenizerCache, paths_under
from worker.modeltasks.registry import REGISTRY, TaskHooks, TaskRegistry, call_task, import_task_modules

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    base = build_model("llama", root / "base", tokenizer=True)
    return {"base": base, "bare": build_model("llama", root / "bare", tokenizer=False),
            "a": build_lora(base, root / "lora-a", seed=1), "b": build_lora(base, root / "lora-b", seed=2)}


@pytest.fixture()
def peft_model(folders: dict[str, Path]) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(folders["base"])
    model = PeftModel.from_pretrained(base, str(folders["a"]), adapter_name="a")
    model.load_adapter(str(folders["b"]), adapter_name="b")
    model.set_adapter("a", inference_mode=True)
    return model.eval()


@pytest.fixture()
def registry() -> TaskRegistry:
    return TaskRegistry()


@pytest.fixture()
def user_task() -> Iterator[str]:
    """A task registered through the public decorator, on the worker's own registry."""
    @model_task("tests.echo")
    def echo(ctx: TaskContext, *values: Any, scale: int = 1) -> dict[str, Any]:
        """Echo the values back, scaled."""
        return {"values": [v * scale for v in values], "model_key": ctx.model_key,
                "adapters": ctx.adapters, "numpy": np.float32(0.5), "tensor": torch.tensor(3),
                "pair": (1, np.int64(2))}
    yield "tests.echo"
    REGISTRY.unregister("tests.echo")


def _ctx(model: torch.nn.Module, **fields: Any) -> TaskContext:
    return TaskContext(model, "k" * 16, **fields)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    return out


# --- lookup, arguments, results --------------------------------------------------------

def test_a_user_task_registered_by_decorator_runs_with_json_out(user_task: str,
                                                                peft_model: PeftModel) -> None:
    outcome = call_task(_ctx(peft_model), user_task, [1, 2], {"scale": 3}, LIMIT)
    assert outcome.value == {"values": [3, 6], "model_key": "k" * 16, "adapters": ["a"], "numpy": 0.5,
                             "tensor": 3, "pair": [1, 2]}
    assert type(outcome.value["tensor"]) is int and not outcome.replaced and outcome.model is peft_model
    assert outcome.size == len('{"values":[3,6],"model_key":"kkkkkkkkkkkkkkkk","adapters":["a"],'
                               '"numpy":0.5,"tensor":3,"pair":[1,2]}')
    assert "tests.echo" in REGISTRY.names() and "modelq.generate" in REGISTRY.names()
    assert REGISTRY.get(user_task).description == "Echo the values back, scaled."


def test_an_unknown_task_is_task_not_found_naming_the_tasks_offered(registry: TaskRegistry) -> None:
    registry.register("acme.one", lambda ctx: 1)
    with pytest.raises(TaskNotFound, match=r"no task named 'acme\.two' .*offers acme\.one.*--tasks") as err:
        call_task(_ctx(torch.nn.Linear(1, 1)), "acme.two", [], {}, LIMIT, registry=registry)
    assert err.value.details == {"task": "acme.two"} and not err.value.retryable


def test_arguments_the_task_does_not_take_are_an_invalid_job(registry: TaskRegistry) -> None:
    registry.register("acme.add", lambda ctx, a, b=1: a + b)
    ctx = _ctx(torch.nn.Linear(1, 1))
    assert call_task(ctx, "acme.add", [1], {"b": 2}, LIMIT, registry=registry).value == 3
    with pytest.raises(InvalidJob, match=r"acme\.add does not take these arguments .*it takes \(a, b=1\)"):
        call_task(_ctx(torch.nn.Linear(1, 1)), "acme.add", [], {"c": 2}, LIMIT, registry=registry)


def test_names_are_dotted_and_taken_once(registry: TaskRegistry) -> None:
    with pytest.raises(ValueError, match="dotted name"):
        registry.register("nodots", lambda ctx: None)
    registry.register("acme.x", lambda ctx: 1)
    with pytest.raises(ValueError, match=r"task 'acme\.x' is registered already by"):
        registry.register("acme.x", lambda ctx: 2)


@pytest.mark.parametrize("value, where", [
    (object(), r"a object at result"),
    ({"scores": torch.ones(3)},
     r"a Tensor \(for a tensor or an array, return \.tolist\(\)\) at result\['scores'\]"),
    ([1, float("nan")], r"the float nan, which JSON cannot hold, at result\[1\]"),
    ({1: "x"}, r"a dict key 1 \(int\) at result"),
    (np.zeros(2), r"a ndarray .* at result"),
])
def test_results_that_are_not_json_fail_the_task_saying_where(registry: TaskRegistry, value: Any,
                                                               where: str) -> None:
    registry.register("acme.bad", lambda ctx: value)
    with pytest.raises(TaskFailed, match=rf"task acme\.bad returned {where}, which is not JSON") as err:
        call_task(_ctx(torch.nn.Linear(1, 1)), "acme.bad", [], {}, LIMIT, registry=registry)
    assert err.value.details["exception_type"] == "NotJSON"


def test_a_result_over_the_limit_is_result_too_large(registry: TaskRegistry) -> None:
    registry.register("acme.big", lambda ctx: "x" * 100)
    assert call_task(_ctx(torch.nn.Linear(1, 1)), "acme.big", [], {}, 102, registry=registry).size == 102
    with pytest.raises(ResultTooLarge, match="returned 102 bytes of JSON, over the limit of 101") as err:
        call_task(_ctx(torch.nn.Linear(1, 1)), "acme.big", [], {}, 101, registry=registry)
    assert err.value.details == {"task": "acme.big", "size": 102, "limit": 101}


# --- errors --------------------------------------------------------------------------

def test_an_exception_in_the_task_is_task_failed_with_the_traceback_in_the_log(
        registry: TaskRegistry, caplog: pytest.LogCaptureFixture) -> None:
    def broken(ctx: TaskContext) -> None:
        raise ValueError("missing column\nsecond line")
    registry.register("acme.broken", broken)
    with caplog.at_level(logging.ERROR, logger="worker.modeltasks.registry"), \
            pytest.raises(TaskFailed) as err:
        call_task(_ctx(torch.nn.Linear(1, 1)), "acme.broken", [], {}, LIMIT, registry=registry)
    assert err.value.message == "task acme.broken raised ValueError: missing column"
    assert err.value.details == {"task": "acme.broken", "exception_type": "ValueError",
                                 "exception_message": "missing column"}
    assert "Traceback" not in err.value.message and "in broken" in caplog.text


@pytest.mark.parametrize("error", [Cancelled("cancelled"), TimedOut("too slow"), AccessDenied("no")])
def test_modelq_errors_from_inside_the_task_pass_through(registry: TaskRegistry, error: Exception) -> None:
    def stopped(ctx: TaskContext) -> None:
        ctx.check_cancel()

    def raise_it() -> None:
        raise error
    registry.register("acme.stopped", stopped)
    with pytest.raises(type(error)) as err:
        call_task(_ctx(torch.nn.Linear(1, 1), hooks=TaskHooks(check_cancel=raise_it)), "acme.stopped", [],
                  {}, LIMIT, registry=registry)
    assert err.value is error


# --- adapters for one call -----------------------------------------------------------

def _activity(registry: TaskRegistry, fail: bool = False, changes: bool = False) -> list[Any]:
    seen: list[Any] = []

    def look(ctx: TaskContext) -> None:
        assert isinstance(ctx.model, PeftModel)
        seen.append((ctx.adapters, list(ctx.model.active_adapters), _logits(ctx.model)))
        if fail:
            raise RuntimeError("boom")
    registry.register("acme.look", look, changes_adapters=changes)
    return seen


@pytest.mark.parametrize("asked", [None, ["b"], ["a", "b"], "b", []])
def test_the_jobs_adapters_are_active_for_the_call_and_the_models_own_after(
        registry: TaskRegistry, peft_model: PeftModel, folders: dict[str, Path], asked: Any) -> None:
    seen = _activity(registry)
    before = _logits(peft_model)
    asked_names = None if asked is None else tuple([asked] if isinstance(asked, str) else asked)
    call_task(_ctx(peft_model, adapters=asked_names), "acme.look", [], {}, LIMIT, registry=registry)
    adapters, active, logits = seen[0]
    expected = ("a",) if asked_names is None else asked_names
    assert adapters == expected
    if expected:
        assert active == list(expected)
    else:  # the base alone
        assert torch.equal(logits, _logits(AutoModelForCausalLM.from_pretrained(folders["base"])))
    assert peft_model.active_adapters == ["a"] and torch.equal(_logits(peft_model), before)
    assert not any(p.requires_grad for p in peft_model.parameters())


def test_adapters_are_put_back_when_the_task_fails(registry: TaskRegistry, peft_model: PeftModel) -> None:
    _activity(registry, fail=True)
    before = _logits(peft_model)
    for asked in (("b",), ()):
        with pytest.raises(TaskFailed):
            call_task(_ctx(peft_model, adapters=asked), "acme.look", [], {}, LIMIT, registry=registry)
        assert peft_model.active_adapters == ["a"] and torch.equal(_logits(peft_model), before)


def test_a_task_that_changes_adapters_keeps_its_change(registry: TaskRegistry, peft_model: PeftModel) -> None:
    _activity(registry, changes=True)
    call_task(_ctx(peft_model, adapters=("b",)), "acme.look", [], {}, LIMIT, registry=registry)
    assert peft_model.active_adapters == ["b"]


def test_adapters_the_model_lacks_are_an_invalid_job(registry: TaskRegistry, peft_model: PeftModel,
                                                     folders: dict[str, Path]) -> None:
    _activity(registry)
    with pytest.raises(InvalidJob, match=r"no adapter named 'c' \(it has 'a', 'b'\)"):
        call_task(_ctx(peft_model, adapters=("c",)), "acme.look", [], {}, LIMIT, registry=registry)
    plain = AutoModelForCausalLM.from_pretrained(folders["base"])
    with pytest.raises(InvalidJob, match="the model has no adapters"):
        call_task(_ctx(plain, adapters=("a",)), "acme.look", [], {}, LIMIT, registry=registry)


def test_a_task_hands_back_a_replaced_model_through_ctx(registry: TaskRegistry) -> None:
    replacement = torch.nn.Linear(1, 1)

    def replace(ctx: TaskContext) -> str:
        ctx.model = replacement
        return "ok"
    registry.register("acme.replace", replace, changes_adapters=True)
    outcome = call_task(_ctx(torch.nn.Linear(1, 1)), "acme.replace", [], {}, LIMIT, registry=registry)
    assert outcome.replaced and outcome.model is replacement


# --- hooks: tokenizer, paths, progress -------------------------------------------------

def test_the_tokenizer_is_loaded_once_per_model_and_its_absence_is_clear(
        folders: dict[str, Path], registry: TaskRegistry) -> None:
    loads: list[str] = []

    def load(folder: Path, key: str) -> Any:
        loads.append(key)
        return _real_tokenizer(folder, key)
    cache = TokenizerCache(load=load)
    registry.register("acme.vocab", lambda ctx: len(ctx.tokenizer))
    model: PreTrainedModel = torch.nn.Linear(1, 1)  # type: ignore[assignment]
    for _ in range(2):
        hooks = TaskHooks(load_tokenizer=cache.loader("m1", folders["base"]))
        outcome = call_task(_ctx(model, hooks=hooks), "acme.vocab", [], {}, LIMIT, registry=registry)
        assert outcome.value == 256
    assert loads == ["m1"]
    with pytest.raises(UnsupportedModel, match=r"model m2 has no tokenizer \(no tokenizer\.json"):
        hooks = TaskHooks(load_tokenizer=TokenizerCache().loader("m2", folders["bare"]))
        call_task(_ctx(model, hooks=hooks), "acme.vocab", [], {}, LIMIT, registry=registry)
    with pytest.raises(UnsupportedModel, match="has no tokenizer: save one"):
        call_task(_ctx(model), "acme.vocab", [], {}, LIMIT, registry=registry)


def _real_tokenizer(folder: Path, key: str) -> Any:
    from worker.modeltasks.io import load_tokenizer

    return load_tokenizer(folder, key)


def test_paths_go_through_the_tenants_check(tmp_path: Path, registry: TaskRegistry) -> None:
    registry.register("acme.path", lambda ctx, p: str(ctx.resolve_path(p, for_writing=True)))
    hooks = TaskHooks(resolve_path=paths_under(tmp_path / "mine"))
    ctx = _ctx(torch.nn.Linear(1, 1), hooks=hooks)
    inside = tmp_path / "mine" / "out"
    assert call_task(ctx, "acme.path", [str(inside)], {}, LIMIT, registry=registry).value == str(inside)
    with pytest.raises(AccessDenied, match="may not write .*outside the tenant's roots"):
        call_task(ctx, "acme.path", [str(tmp_path / "mine" / ".." / "theirs")], {}, LIMIT, registry=registry)
    with pytest.raises(AccessDenied, match="tasks may name no local paths"):
        call_task(_ctx(torch.nn.Linear(1, 1)), "acme.path", [str(inside)], {}, LIMIT, registry=registry)


def test_progress_reaches_the_hook_with_metrics(registry: TaskRegistry) -> None:
    reported: list[Any] = []

    def steps(ctx: TaskContext) -> None:
        ctx.progress(1, 2, {"loss": np.float32(2.5)})
        ctx.progress(2, 2)
    registry.register("acme.steps", steps)
    hooks = TaskHooks(progress=lambda done, total, metrics: reported.append((done, total, metrics)))
    call_task(_ctx(torch.nn.Linear(1, 1), hooks=hooks), "acme.steps", [], {}, LIMIT, registry=registry)
    assert reported == [(1, 2, {"loss": 2.5}), (2, 2, None)]
    assert type(reported[0][2]["loss"]) is float


def test_import_task_modules_registers_the_users_tasks(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "acme_tasks_for_test.py").write_text(textwrap.dedent("""
        from worker import TaskContext, model_task

        @model_task("acme.length")
        def length(ctx: TaskContext, text: str) -> int:
            return len(text)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "acme.length" in import_task_modules(["acme_tasks_for_test"])
        assert call_task(_ctx(torch.nn.Linear(1, 1)), "acme.length", ["four"], {}, LIMIT).value == 4
        with pytest.raises(ImportError, match="cannot import task module 'acme_no_such_module'"):
            import_task_modules(["acme_no_such_module"])
    finally:
        REGISTRY.unregister("acme.length")
        sys.modules.pop("acme_tasks_for_test", None)
