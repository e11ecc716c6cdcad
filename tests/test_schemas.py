"""schemas/: refs validated as the hub validates them, spec cross-field checks, job rules,
decoding errors, JSON round trips and errors that pickle across processes."""

from __future__ import annotations

import multiprocessing
import pickle
from datetime import UTC, datetime

import pytest
from huggingface_hub.utils import HFValidationError
from huggingface_hub.utils import validate_repo_id as hub_validate_repo_id
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import (
    TERMINAL,
    AdapterSpec,
    AttachAdapterJob,
    BrokerUnavailable,
    Envelope,
    ErrorInfo,
    Event,
    InvalidJob,
    JobRecord,
    JobStatus,
    LoadJob,
    ModelInfo,
    ModelNotFound,
    ModelqError,
    ModelRef,
    PlacementSpec,
    QuantizationSpec,
    RemoteCodeNotAllowed,
    UnloadJob,
    decode_envelope,
    parse_bytes,
    parse_job,
    validate_repo_id,
)
from schemas.errors import ERROR_TYPES, error_from
from schemas.records import BaseModelInfo

COMMIT = "0123456789abcdef0123456789abcdef01234567"
KEY = "0123456789abcdef0123456789abcdef"


# --- ModelRef ------------------------------------------------------------------------

def _hub_accepts(repo_id: str) -> bool:
    try:
        hub_validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def _ours_accepts(repo_id: str) -> bool:
    try:
        validate_repo_id(repo_id)
    except ValueError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ab9_-./é", max_size=12) | st.text(alphabet="ab", min_size=95, max_size=99))
def test_repo_id_rule_matches_huggingface_hub(repo_id: str) -> None:
    assert _ours_accepts(repo_id) == _hub_accepts(repo_id)


@pytest.mark.parametrize("repo_id", ["gpt2", "org/name", "Org-1/Name_2.v3", "a" * 96, "a/" + "b" * 96])
def test_valid_repo_ids_parse_as_hub_refs(repo_id: str) -> None:
    ref = ModelRef.model_validate(repo_id)
    assert (ref.repo_id, ref.path) == (repo_id, None)


@pytest.mark.parametrize("repo_id, says", [
    ("a/b/c", "namespace/name"), ("org/-x", "letters, digits"), ("org--x/y", "'--'"),
    ("org/x..y", "'..'"), ("org/x.git", ".git"), ("a" * 97, "96"), ("café/x", "letters"),
])
def test_invalid_repo_ids_say_what_to_change(repo_id: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        ModelRef.model_validate(repo_id)


@pytest.mark.parametrize("text, path", [("/models/x", "/models/x"), ("./x", "./x"), ("../x", "../x"),
                                        ("~/x", "~/x"), ("/with space/x", "/with space/x")])
def test_paths_parse_as_local_refs(text: str, path: str) -> None:
    ref = ModelRef.model_validate(text)
    assert (ref.path, ref.repo_id) == (path, None)
    assert ref.display == path


def test_ref_rules() -> None:
    assert ModelRef(repo_id="o/n", revision="v1.0").display == "o/n@v1.0"
    for bad in ("", "   ", " /padded ", "/x\ny", "/x\x00", {"repo_id": "o/n", "path": "/x"}, {},
                {"path": "relative/x"},
                {"path": "/x", "revision": "main"}, {"repo_id": "o/n", "revision": "bad rev"},
                {"repo_id": "o/n", "extra": 1}):
        with pytest.raises(ValidationError):
            ModelRef.model_validate(bad)


# --- QuantizationSpec / PlacementSpec ---------------------------------------------------

@pytest.mark.parametrize("spec", [
    "none", "int8", "nf4", "fp4", {"method": "int8", "int8_threshold": 4.0, "skip_modules": ["lm_head"]},
    {"method": "nf4", "double_quant": True, "compute_dtype": "float16"},
    {"method": "fp4", "double_quant": False, "compute_dtype": "float32", "skip_modules": ["a.b"]},
])
def test_quantization_specs_that_fit(spec: object) -> None:
    parsed = QuantizationSpec.model_validate(spec)
    given = {"method": spec} if isinstance(spec, str) else spec
    shown = parsed.model_dump(mode="json")  # what the job's record shows
    assert {field: shown[field] for field in given} == given
    assert parsed.quantized is (given["method"] != "none")
    assert QuantizationSpec.model_validate(shown) == parsed


@pytest.mark.parametrize("spec, says", [
    ({"method": "int8", "double_quant": True}, "4-bit"),
    ({"method": "int8", "compute_dtype": "bfloat16"}, "4-bit"),
    ({"method": "nf4", "int8_threshold": 6.0}, "int8 only"),
    ({"method": "none", "skip_modules": ["lm_head"]}, "need a method"),
    ({"method": "nf4", "compute_dtype": "auto"}, "float32, bfloat16 or float16"),
    ({"method": "nf4", "compute_dtype": "float64"}, "compute_dtype"),
    ({"method": "int8", "int8_threshold": 0}, "greater than 0"),
    ({"method": "nf4", "skip_modules": ["lm head"]}, "module name"),
    ({"method": "int4"}, "method"),
])
def test_quantization_cross_field_errors(spec: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        QuantizationSpec.model_validate(spec)


@pytest.mark.parametrize("device_map", ["auto", "balanced", "sequential", "cpu", "cuda", "cuda:0", "disk",
                                        {"": "cpu"}, {"model.layers.0": 0, "lm_head": "cpu"}])
def test_placement_device_maps(device_map: object) -> None:
    assert PlacementSpec(device_map=device_map).device_map == device_map  # type: ignore[arg-type]


def test_placement_errors_and_memory_sizes() -> None:
    for bad in ("gpu", "cuda:x", {}, {"bad key!": "cpu"}, {"lm_head": "tpu"}):
        with pytest.raises(ValidationError):
            PlacementSpec(device_map=bad)  # type: ignore[arg-type]
    spec = PlacementSpec.model_validate({"max_memory": {"0": "20GiB", "cpu": "500MB", "cuda:1": 1024}})
    assert spec.max_memory == {"0": 20 * 2**30, "cpu": 500 * 10**6, "cuda:1": 1024}
    for bad_memory in ({}, {"tpu": "1GiB"}, {"cpu": "lots"}, {"cpu": -1}, ["cpu"]):
        with pytest.raises(ValidationError):
            PlacementSpec.model_validate({"max_memory": bad_memory})
    assert parse_bytes(" 1.5 KiB ") == 1536 and parse_bytes("30gib") == 30 * 2**30
    for bad_size in (" 1GiB", "1e3", 1.5, True, "1" * 33, "1\n"):
        with pytest.raises(ValidationError):
            PlacementSpec.model_validate({"max_memory": {"cpu": bad_size}})
    assert PlacementSpec.model_validate({"max_memory": {"cpu": 2.0}}).max_memory == {"cpu": 2}
    assert parse_bytes("9007199254740993") == 9007199254740993  # exact, not through a float
    assert parse_bytes("0.5KiB") == 512 and parse_bytes("1" * 32) == 2**63 - 1  # past 8 EiB: no limit


# --- jobs ---------------------------------------------------------------------------------

def test_load_job_defaults_and_adapter_strings() -> None:
    job = LoadJob.model_validate({"model": "org/m", "adapters": ["/a", {"ref": "org/b", "name": "b"}]})
    assert job.trust_remote_code is False and job.tenant == "default"
    assert job.quantization.method.value == "none" and job.placement.device_map is None
    assert job.adapters == (AdapterSpec(ref=ModelRef(path="/a")),
                            AdapterSpec(ref=ModelRef(repo_id="org/b"), name="b"))


@pytest.mark.parametrize("job, says", [
    ({"model": "o/m", "adapters": ["/a", "/b"]}, "give each a name"),
    ({"model": "o/m", "adapters": ["/a"] * 33}, "at most 32"),
    ({"model": "o/m", "trust_remote_code": "yes"}, "boolean"),
    ({"model": "o/m", "timeout_seconds": "30"}, "number"),
    ({"model": "o/m", "active_adapter": "bad name"}, "adapter name"),
    ({"model": "o/m", "trust_remote_code": True}, "40-character commit"),
    ({"model": "o/m", "revision": "main"}, "Extra inputs"),
    ({"model": "o/m", "tenant": "Not Ok"}, "tenant"),
    ({"model": "o/m", "dtype": "float64"}, "dtype"),
    ({"model": "o/m", "adapters": [{"ref": "/a", "name": "-x"}]}, "adapter name"),
])
def test_load_job_rules(job: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        LoadJob.model_validate(job)


def test_adapter_names_are_compared_by_the_worker_not_here() -> None:
    """JSON Schema cannot compare values, so the schema could not give this verdict: the worker
    refuses a name given twice, or an active_adapter it does not hold, as InvalidJob."""
    twice = [{"ref": "/a", "name": "x"}, {"ref": "/b", "name": "x"}]
    job = LoadJob.model_validate({"model": "o/m", "adapters": twice})
    assert [(a.ref.path, a.name) for a in job.adapters] == [("/a", "x"), ("/b", "x")]  # kept as sent
    job = LoadJob.model_validate({"model": "o/m", "adapters": [{"ref": "/a", "name": "x"}],
                                  "active_adapter": "y"})
    assert job.active_adapter == "y" and [a.name for a in job.adapters] == ["x"]


def test_load_job_rules_that_pass() -> None:
    pinned = LoadJob.model_validate({"model": {"repo_id": "o/m", "revision": COMMIT},
                                     "trust_remote_code": True})
    assert pinned.trust_remote_code and pinned.model.display == f"o/m@{COMMIT}"
    local = LoadJob.model_validate({"model": "/local", "trust_remote_code": True})
    assert local.trust_remote_code and local.model.path == "/local"  # a folder: nothing to pin
    one = LoadJob.model_validate({"model": "o/m", "adapters": ["/a"], "active_adapter": "default"})
    assert [(a.ref.path, a.name) for a in one.adapters] == [("/a", None)]  # named 'default' by the worker
    two = LoadJob.model_validate({"model": "o/m", "adapters": [{"ref": "/a", "name": "x"}, "/b"],
                                  "active_adapter": "default"})
    assert [a.name for a in two.adapters] == ["x", None] and two.active_adapter == "default"


def test_attach_and_unload_job_rules() -> None:
    job = AttachAdapterJob.model_validate({"model_key": KEY, "adapter": "/a"})
    assert (job.name, job.activate) == ("default", True)
    for bad in ({"model_key": "not-hex", "adapter": "/a"}, {"model_key": KEY, "adapter": "/a", "name": ""},
                {"model_key": KEY, "adapter": "a/b/c"}, {"model_key": KEY}):
        with pytest.raises(ValidationError):
            AttachAdapterJob.model_validate(bad)
    with pytest.raises(ValidationError):
        UnloadJob.model_validate({"model_key": "XYZ"})


def test_parse_job_dispatches_by_kind_and_raises_invalid_job() -> None:
    assert isinstance(parse_job({"kind": "load", "model": "o/m"}), LoadJob)
    assert isinstance(parse_job(f'{{"kind": "attach", "model_key": "{KEY}", "adapter": "/a"}}'),
                      AttachAdapterJob)
    assert isinstance(parse_job({"kind": "unload", "model_key": KEY}), UnloadJob)
    for bad, says in (({"kind": "train", "model": "o/m"}, "kind"), ({"model": "o/m"}, "kind"),
                      ("{not json", "JSON"), ({"kind": "load", "model": "a/b/c"}, "model")):
        with pytest.raises(InvalidJob, match=says) as info:
            parse_job(bad)
        assert isinstance(info.value, ValueError) and info.value.type == "InvalidJob"
    with pytest.raises(InvalidJob) as info:
        parse_job({"kind": "load", "model": "o/m", "quantization": {"method": "int8", "double_quant": True}})
    assert info.value.message.startswith("load.quantization:")


def test_decode_envelope_errors() -> None:
    good = Envelope(job_id="j1", submitted_at=datetime.now(UTC), job=LoadJob(model="o/m"))
    assert decode_envelope(good.model_dump(mode="json")) == good
    assert decode_envelope(good.model_dump_json()) == good
    payload = good.model_dump(mode="json")
    for change in ({"schema_version": 2}, {"job": {"kind": "load"}}, {"job_id": None}, {"x": 1}):
        with pytest.raises(InvalidJob):
            decode_envelope({**payload, **change})
    with pytest.raises(InvalidJob):
        decode_envelope(b"\x00garbage")


# --- records round trip ------------------------------------------------------------------

def _record() -> JobRecord:
    at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    info = ModelInfo(model_key=KEY, model_class="LlamaForCausalLM",
                     base_model=BaseModelInfo(ref="o/m", revision=COMMIT, path="/cache/x"),
                     num_parameters=10, footprint_bytes=40, dtype="bfloat16", quantization="nf4",
                     device_map={"": "cpu"}, adapters=("a", "b"), active_adapters=("b",))
    job = LoadJob.model_validate({"model": {"repo_id": "o/m", "revision": COMMIT},
                                  "quantization": {"method": "nf4", "double_quant": True},
                                  "placement": {"device_map": {"lm_head": 0}, "max_memory": {"0": "1GiB"}},
                                  "adapters": [{"ref": "/a", "name": "a"}, {"ref": "/b", "name": "b"}]})
    return JobRecord(job_id="j1", kind="load", tenant="default", status=JobStatus.succeeded,
                     created_at=at, started_at=at, finished_at=at, result=info, job=job,
                     error=ErrorInfo(type="LoadFailed", message="m", retryable=True, details={"k": "v"}))


def test_records_and_events_round_trip_through_json() -> None:
    record = _record()
    assert JobRecord.model_validate_json(record.model_dump_json()) == record
    assert record.terminal and TERMINAL == {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}
    event = Event(job_id="j1", at=record.created_at, status=JobStatus.running, message="x")
    assert Event.model_validate_json(event.model_dump_json()) == event
    with pytest.raises(ValidationError):  # frozen
        record.status = JobStatus.failed  # type: ignore[misc]


# --- errors -------------------------------------------------------------------------------

def _roundtrip_in_child(exc: ModelqError) -> ModelqError:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(pickle.loads, (pickle.dumps(exc),))  # type: ignore[no-any-return]


def test_errors_pickle_across_processes_with_their_fields() -> None:
    exc = ModelNotFound("folder /x does not exist", ref="/x")
    back = _roundtrip_in_child(exc)
    assert type(back) is ModelNotFound and back.message == exc.message and back.details == {"ref": "/x"}
    assert isinstance(back, FileNotFoundError) and back.type == "ModelNotFound"
    for cls in ERROR_TYPES.values():
        again = pickle.loads(pickle.dumps(cls("msg", a=1)))
        assert (type(again), again.message, again.details, again.retryable) == \
            (cls, "msg", {"a": 1}, cls.retryable)


def test_error_classes_mix_in_builtins_and_retryable() -> None:
    assert isinstance(RemoteCodeNotAllowed("x"), PermissionError)
    assert isinstance(BrokerUnavailable("x"), ConnectionError) and BrokerUnavailable.retryable
    assert not ModelNotFound.retryable and not InvalidJob.retryable
    assert type(error_from("NoSuchType", "m")) is ModelqError
    assert type(error_from("UnsafeWeights", "m")).__name__ == "UnsafeWeights"
