"""schemas/ for run jobs: RunJob's model target, adapters, args and limits; RunResult in records,
told apart from ModelInfo; Event metrics; the task errors; `modelq schema` names them."""

from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas import (
    Event,
    InvalidJob,
    Job,
    JobKind,
    JobRecord,
    JobStatus,
    LoadJob,
    ModelInfo,
    ModelqError,
    ModelRef,
    ModelTarget,
    ResultTooLarge,
    RunJob,
    RunResult,
    TaskFailed,
    TaskNotFound,
    parse_job,
)
from schemas.errors import ERROR_TYPES
from schemas.jobs import MAX_RUN_ARGUMENTS_BYTES
from schemas.records import BaseModelInfo
from tasks.cli.schema_doc import json_schema

KEY = "0123456789abcdef0123456789abcdef"
NOW = datetime(2025, 1, 1, tzinfo=UTC)


def _run(**fields: Any) -> RunJob:
    job = parse_job({"kind": "run", "task": "acme.score", "model": {"model_key": KEY}, **fields})
    assert isinstance(job, RunJob)
    return job


def _info() -> ModelInfo:
    return ModelInfo(model_key=KEY, model_class="LlamaForCausalLM",
                     base_model=BaseModelInfo(ref="/models/tiny", path="/models/tiny"),
                     num_parameters=10, footprint_bytes=40, dtype="float32", quantization="none",
                     device_map={"": "cpu"}, adapters=("a",), active_adapters=("a",))


# --- RunJob --------------------------------------------------------------------------

def test_a_run_job_round_trips_through_json() -> None:
    job = _run(adapters=["a", "b"], args=["hello", [1, 2]], kwargs={"max_new_tokens": 4},
               timeout_seconds=30, tenant="team-a")
    assert job.kind == "run" and job.model.model_key == KEY and job.model.load is None
    assert job.adapters == ("a", "b") and job.args == ("hello", [1, 2])
    assert parse_job(job.model_dump_json()) == job


@pytest.mark.parametrize("adapters, expected", [(None, None), ("a", ("a",)), (["a", "b"], ("a", "b")),
                                                ([], ())])
def test_adapters_none_a_name_a_list_or_the_base_alone(adapters: Any, expected: Any) -> None:
    assert _run(adapters=adapters).adapters == expected


@pytest.mark.parametrize("name", ["acme.score", "modelq.generate", "a.b.c_d", "_x.y2"])
def test_dotted_task_names_validate(name: str) -> None:
    assert _run(task=name).task == name


@pytest.mark.parametrize("name", ["score", "acme.", ".score", "acme..score", "acme.2score", "acme.sc ore",
                                  "acme/score", "acme." + "x" * 200, ""])
def test_bad_task_names_say_what_a_name_is(name: str) -> None:
    with pytest.raises(InvalidJob, match="task: task name .* (dotted name|over the limit of 128)"):
        _run(task=name)


def test_a_bare_string_is_a_model_key_and_a_load_job_a_load_target() -> None:
    assert RunJob.model_validate({"task": "acme.score", "model": KEY}).model.model_key == KEY
    load = LoadJob(model=ModelRef(repo_id="org/name"))
    job = RunJob.model_validate({"task": "acme.score", "model": load, "tenant": "team-a"})
    assert RunJob(task="acme.score", model=ModelTarget(load=load), tenant="team-a") == job
    assert job.model.load is not None and job.model.load.model == load.model
    assert job.model.load.tenant == "team-a"  # the run job's tenant, not the load job's default


def test_a_load_target_in_json_takes_the_run_jobs_tenant() -> None:
    job = _run(model={"load": {"model": "org/name", "quantization": "nf4"}}, tenant="team-a")
    assert job.model.load is not None and job.model.load.tenant == "team-a"
    assert job.model.load.quantization.method.value == "nf4"


def test_a_load_target_runs_as_the_run_jobs_tenant_whatever_it_names() -> None:
    job = _run(model={"load": {"model": "org/name", "tenant": "team-b"}}, tenant="team-a")
    assert job.model.load is not None and job.model.load.tenant == "team-a"


@pytest.mark.parametrize("model, message", [
    ({}, "exactly one of 'model_key'"),
    ({"model_key": KEY, "load": {"model": "org/name"}}, "exactly one of 'model_key'"),
    ({"model_key": "not-hex"}, "model key 'not-hex' must be the hex key"),
    ({"load": {"model": "org/name", "quantization": {"method": "none", "double_quant": True}}},
     "quantization options need a method"),
    ({"load": {"model": "org/name", "tenant": "Team B"}}, "tenant 'Team B'"),
])
def test_bad_model_targets_are_refused(model: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidJob, match=message):
        _run(model=model, tenant="team-a")


@pytest.mark.parametrize("fields, message", [
    ({"adapters": ["a", "a"]}, "adapter names must be unique"),
    ({"adapters": ["bad name"]}, "adapter name 'bad name'"),
    ({"args": "not a list"}, "args"),
    ({"kwargs": ["not", "a", "dict"]}, "kwargs"),
    ({"kwargs": {"x": float("nan")}}, "NaN and Infinity"),
    ({"timeout_seconds": 0}, "timeout_seconds"),
    ({"extra": 1}, "extra"),
])
def test_bad_run_fields_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidJob, match=message):
        _run(**fields)


def test_args_and_kwargs_are_bounded_in_size() -> None:
    half = "x" * (MAX_RUN_ARGUMENTS_BYTES // 2)
    assert _run(args=[half]).args == (half,)  # half the limit is taken whole
    with pytest.raises(InvalidJob, match=r"take \d+ bytes as JSON, over the limit of 1048576"):
        _run(args=["x" * (MAX_RUN_ARGUMENTS_BYTES // 2)], kwargs={"y": "y" * (MAX_RUN_ARGUMENTS_BYTES // 2)})


def test_job_is_the_one_union_name() -> None:
    import schemas.records

    assert not hasattr(schemas.records, "JobSpec")
    from pydantic import TypeAdapter

    assert isinstance(TypeAdapter(Job).validate_python({"kind": "run", "task": "a.b", "model": KEY}), RunJob)
    assert JobKind.run.value == "run"


# --- records and events ----------------------------------------------------------------

def _record(kind: JobKind, job: Any, result: Any) -> JobRecord:
    return JobRecord(job_id="j1", kind=kind, tenant="default", status=JobStatus.succeeded,
                     created_at=NOW, job=job, result=result)


def test_a_run_record_holds_a_run_result_and_round_trips() -> None:
    result = RunResult(model_key=KEY, value={"scores": [1.5, -2.0], "ok": True}, seconds=0.25,
                       cache_hit=True, model=_info())
    record = _record(JobKind.run, _run(), result)
    again = JobRecord.model_validate_json(record.model_dump_json())
    assert isinstance(again.result, RunResult) and again == record
    assert again.result.value == {"scores": [1.5, -2.0], "ok": True}


def test_a_load_record_still_holds_a_model_info() -> None:
    record = _record(JobKind.load, LoadJob(model=ModelRef(path="/models/tiny")), _info())
    again = JobRecord.model_validate_json(record.model_dump_json())
    assert isinstance(again.result, ModelInfo) and again == record


def test_a_result_must_fit_the_records_kind() -> None:
    run_result = RunResult(model_key=KEY, value=None, seconds=0.0, cache_hit=False, model=_info())
    with pytest.raises(ValueError, match="a load job's result must be a ModelInfo"):
        _record(JobKind.load, LoadJob(model=ModelRef(path="/models/tiny")), run_result)
    with pytest.raises(ValueError, match="a run job's result must be a RunResult"):
        _record(JobKind.run, _run(), _info())


def test_a_malformed_run_result_is_reported_as_one() -> None:
    data = json.loads(_record(JobKind.run, _run(), RunResult(
        model_key=KEY, value=1, seconds=0.0, cache_hit=False, model=_info())).model_dump_json())
    del data["result"]["seconds"]
    with pytest.raises(ValueError, match=r"result\.run\.seconds"):
        JobRecord.model_validate(data)


def test_events_may_carry_metrics() -> None:
    event = Event(job_id="j1", at=NOW, status=JobStatus.running, metrics={"loss": 2.5})
    assert Event.model_validate_json(event.model_dump_json()).metrics == {"loss": 2.5}
    assert Event(job_id="j1", at=NOW, status=JobStatus.running).metrics is None


# --- errors and the schema document ----------------------------------------------------

@pytest.mark.parametrize("error", [
    TaskNotFound("no task 'acme.x'", task="acme.x"),
    TaskFailed("task acme.x raised ValueError: bad", task="acme.x", exception_type="ValueError",
               exception_message="bad"),
    ResultTooLarge("too large", size=10, limit=5),
])
def test_task_errors_are_modelq_errors_that_pickle_and_do_not_retry(error: ModelqError) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and again.details == error.details and not again.retryable
    assert ERROR_TYPES[error.type] is type(error)
    assert isinstance(TaskNotFound("x"), LookupError)


def test_modelq_schema_describes_run_jobs_and_results() -> None:
    definitions = json_schema()["$defs"]
    assert definitions["RunJob"]["properties"]["kind"]["const"] == "run"
    assert "value" in definitions["RunResult"]["properties"]
    assert "RunJob" in json.dumps(definitions["Envelope"])
    assert "RunResult" in json.dumps(definitions["JobRecord"])
