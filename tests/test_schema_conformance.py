"""`modelq schema` gives the server's verdict: jsonschema over json_schema() and schemas.parse_job
agree on a corpus of valid and invalid jobs (each limit at its edge and one past it, control
characters, NUL, 5 MB strings) and on generated ones; every $ref resolves; errors stay short."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from schemas import InvalidJob, parse_job
from schemas.text import MAX_JSON_DEPTH
from tasks.cli.schema_doc import SCHEMA_ID, json_schema
from tests.support.jsonschema_strategies import from_schema

KEY = "0123456789abcdef0123456789abcdef"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BIG = "x" * 5_000_000
DOC = json_schema()
VALIDATOR = Draft202012Validator(DOC, format_checker=Draft202012Validator.FORMAT_CHECKER)
GENERATED = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def server_accepts(job: Any) -> bool:
    """parse_job's verdict, the same for the job as a dict and as JSON text."""
    verdicts = []
    for payload in (job, json.dumps(job)):
        try:
            parse_job(payload)
            verdicts.append(True)
        except InvalidJob:
            verdicts.append(False)
    assert verdicts[0] == verdicts[1], f"dict and JSON text disagree on {json.dumps(job)[:200]}"
    return verdicts[0]


def assert_agree(job: Any) -> bool:
    server = server_accepts(job)
    schema = VALIDATOR.is_valid(job)
    assert schema == server, f"schema says {schema}, server {server}: {json.dumps(job)[:300]}"
    return server


def assert_agree_and_read_back(job: Any) -> bool:
    """`assert_agree`; and a job the server takes reads back as the user sent it: its JSON as
    a record shows it is valid by the schema and parses to the same job."""
    accepted = assert_agree(job)
    if accepted:
        parsed = parse_job(job)
        shown = parsed.model_dump(mode="json")
        assert VALIDATOR.is_valid(shown), f"the schema refuses the accepted job as shown: {shown}"
        assert parse_job(shown) == parsed
    return accepted


def load(**fields: Any) -> dict[str, Any]:
    return {"kind": "load", "model": "org/name", **fields}


def run(**fields: Any) -> dict[str, Any]:
    return {"kind": "run", "task": "acme.score", "model": KEY, **fields}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# The nine samples of the issue, and whether the server takes them.
SAMPLES = [
    (load(model={}), False), (load(model={"repo_id": "o/n", "path": "/x"}), False),
    (load(model={"path": "relative/x"}), False), (load(placement={"max_memory": {"0": -1}}), False),
    (load(model="org/name"), True), (load(placement={"max_memory": {"cpu": "30GiB"}}), True),
    (load(model={"repo_id": "org/name"}), True), (load(model={"path": "/models/x"}), True),
    (load(model="./models/x"), True),
]
README = [
    load(model={"repo_id": "meta-llama/Llama-2-7b-hf"}, quantization={"method": "nf4", "double_quant": True},
         adapters=[{"ref": "my-org/llama-2-7b-lora"}]),
    load(model="./my-model", quantization="nf4", adapters=["./my-lora"]),
    {"kind": "attach", "model_key": KEY, "adapter": "org/lora", "name": "b", "activate": False},
    {"kind": "unload", "model_key": KEY}, {"kind": "unload", "model_key": KEY, "adapter": "b"},
    run(adapters=["a", "b"], args=["hello", [1, 2]], kwargs={"max_new_tokens": 4}, timeout_seconds=30),
    run(model={"load": {"model": "org/name", "quantization": "nf4"}}, tenant="team-a", adapters="a"),
]
EDGES = [  # (at the limit, one past it)
    (load(model="a" * 96 + "/" + "b" * 96), load(model="a" * 97 + "/b")),
    (load(model="/" + "p" * 4095), load(model="/" + "p" * 4096)),
    (load(model={"repo_id": "o/n", "revision": "r" * 255}),
     load(model={"repo_id": "o/n", "revision": "r" * 256})),
    (load(tenant="t" * 64), load(tenant="t" * 65)),
    (load(active_adapter="a" * 64), load(active_adapter="a" * 65)),
    (load(adapters=[{"ref": "/a", "name": f"a{i}"} for i in range(32)]),
     load(adapters=[{"ref": "/a", "name": f"a{i}"} for i in range(33)])),
    (load(quantization={"method": "int8", "skip_modules": ["m"] * 64}),
     load(quantization={"method": "int8", "skip_modules": ["m"] * 65})),
    (load(quantization={"method": "int8", "skip_modules": ["m" * 256]}),
     load(quantization={"method": "int8", "skip_modules": ["m" * 257]})),
    (load(placement={"max_memory": {str(i): 1 for i in range(64)}}),
     load(placement={"max_memory": {str(i): 1 for i in range(65)}})),
    (load(placement={"device_map": {f"m{i}": 0 for i in range(1024)}}),
     load(placement={"device_map": {f"m{i}": 0 for i in range(1025)}})),
    (load(placement={"max_memory": {"cpu": "1" * 32}}), load(placement={"max_memory": {"cpu": "1" * 33}})),
    (load(placement={"device_map": {"": 9999}}), load(placement={"device_map": {"": 10000}})),
    (load(timeout_seconds=10**7), load(timeout_seconds=10**7 + 1)),
    (load(quantization={"method": "int8", "int8_threshold": 10**4}),
     load(quantization={"method": "int8", "int8_threshold": 10**4 + 0.5})),
    ({"kind": "unload", "model_key": "a" * 64}, {"kind": "unload", "model_key": "a" * 65}),
    (run(task="a." + "b" * 126), run(task="a." + "b" * 127)),
    (run(kwargs={"k" * 128: 1}), run(kwargs={"k" * 129: 1})),
    (run(args=[0] * 1024), run(args=[0] * 1025)),
    (run(args=[nested(MAX_JSON_DEPTH)]), run(args=[nested(MAX_JSON_DEPTH + 1)])),
    (run(kwargs={"x": nested(MAX_JSON_DEPTH)}), run(kwargs={"x": nested(MAX_JSON_DEPTH + 1)})),
    (run(adapters=[f"a{i}" for i in range(32)]), run(adapters=[f"a{i}" for i in range(33)])),
]
FIELDS = [  # where a bad string goes
    lambda s: load(model=s), lambda s: load(model="/models/" + s), lambda s: load(model={"path": "/m/" + s}),
    lambda s: load(model={"repo_id": "o/n", "revision": s}), lambda s: load(tenant=s),
    lambda s: load(adapters=[{"ref": "/a", "name": s}]), lambda s: load(active_adapter=s),
    lambda s: load(quantization={"method": "nf4", "skip_modules": [s]}),
    lambda s: load(placement={"device_map": {s: 0}}), lambda s: load(placement={"max_memory": {"cpu": s}}),
    lambda s: load(placement={"device_map": s}), lambda s: {"kind": "unload", "model_key": s},
    lambda s: {"kind": s, "model": "org/name"}, lambda s: run(task=s), lambda s: run(kwargs={s: 1}),
    lambda s: run(adapters=[s]), lambda s: load(**{s: 1}),
]
BAD_STRINGS = ["a\nb", "a\x00b", "/x\n", "org/name\n", "a\x7f", "a\x85b", "a\tb", "", " ", "é", BIG]
ACCEPTED = [  # the server takes them, and the schema must too
    load(model={"repo_id": "o/n", "revision": COMMIT}, trust_remote_code=True),
    load(model="/x", trust_remote_code=True), load(quantization={"method": "none", "skip_modules": []}),
    load(quantization={"method": "fp4", "double_quant": False, "compute_dtype": "float16"}),
    load(quantization={"int8_threshold": None}), load(placement={"max_memory": {"cpu": 1.0}}),
    load(placement={"max_memory": {"cpu": "1 GiB"}}), load(placement={"device_map": {"lm_head": 1.0}}),
    load(placement={"device_map": "balanced_low_0"}),
    load(adapters=[{"ref": "/a", "name": "x"}, {"ref": "/b", "name": "x"}]),
    load(model={"path": "/x", "revision": None}), load(model={"repo_id": None, "path": "/x"}),
    load(model="~"), load(model="."), load(model=".."), run(model={"model_key": KEY, "load": None}),
    run(adapters=[]), run(adapters=None), run(args=[{"deep": nested(3)}, "text\nwith newline"]),
]
REFUSED = [  # the server refuses them (InvalidJob, nothing enqueued), and the schema must too
    load(model=" org/name"), load(model="org/name "), load(trust_remote_code=True),
    load(trust_remote_code="true"), load(pin=1), load(timeout_seconds="30"), load(timeout_seconds=0),
    load(timeout_seconds=True), load(quantization={"skip_modules": ["x"]}),
    load(quantization={"method": "nf4", "compute_dtype": "auto"}),
    load(placement={"max_memory": {"cpu": 1.5}}), load(placement={"max_memory": {"cpu": True}}),
    load(placement={"max_memory": {"cpu": "1  GiB"}}), load(placement={"max_memory": {"tpu": "1GiB"}}),
    load(placement={"device_map": {"lm_head": True}}), load(placement={"device_map": 0}),
    load(placement={"device_map": "cuda:٣"}), load(adapters=["/a", {"ref": "/b"}]), load(adapters="/a"),
    load(model={"path": "/x", "revision": "main"}), load(model={"repo_id": "café/x"}), load(model="a/b/c"),
    load(model="org/x.git"), load(model="o--x"), run(model={"model_key": KEY, "load": {"model": "o/n"}}),
    run(model={"load": {"model": "o/n", "tenant": "Team B"}}),
    run(model={"load": {"model": "o/n", "kind": "run"}}), run(adapters=["a", "a"]), run(args=None),
    run(kwargs=[]), run(task="acme"), {"model": "org/name"}, [], "load", None, 1,
    {"kind": "load", "model": "org/name", "schema_version": 1},
]


@pytest.mark.parametrize("job, accepted", SAMPLES)
def test_the_issues_samples(job: dict[str, Any], accepted: bool) -> None:
    assert assert_agree_and_read_back(job) is accepted


@pytest.mark.parametrize("job, accepted", [(job, True) for job in README + ACCEPTED]
                         + [(job, False) for job in REFUSED])
def test_readme_examples_and_rules(job: Any, accepted: bool) -> None:
    assert assert_agree_and_read_back(job) is accepted


@pytest.mark.parametrize("at, past", EDGES)
def test_each_limit_at_its_edge_and_one_past(at: dict[str, Any], past: dict[str, Any]) -> None:
    assert assert_agree_and_read_back(at) and not assert_agree(past)


@pytest.mark.parametrize("bad", BAD_STRINGS, ids=lambda s: repr(s[:8]))
@pytest.mark.parametrize("field", range(len(FIELDS)))
def test_control_characters_nul_and_huge_strings_in_every_field(field: int, bad: str) -> None:
    job = FIELDS[field](bad)
    accepted = assert_agree_and_read_back(job)
    if any(c in bad for c in "\n\x00\x7f\x85\t") or bad is BIG:
        assert not accepted


def _from_definition(name: str) -> st.SearchStrategy[Any]:
    """Instances hypothesis-jsonschema draws from one definition (run args left out: it inlines
    every $ref, and its canonicalising is slow, so the big job kinds come from strategies below)."""
    definitions = {k: v for k, v in DOC["$defs"].items() if not k.startswith("Json")}
    return from_schema({"$defs": definitions, "$ref": f"#/$defs/{name}"})


from_the_schema = st.deferred(lambda: st.one_of(
    _from_definition("UnloadJob").map(lambda job: {**job, "kind": "unload"}),
    _from_definition("QuantizationSpec").map(lambda spec: load(quantization=spec)),
    _from_definition("PlacementSpec").map(lambda spec: load(placement=spec)),
    _from_definition("AdapterSpec").map(lambda spec: load(adapters=[spec]))))


def test_the_schema_generator_draws_filled_objects() -> None:
    """The generator under the locked hypothesis reaches optional properties and nested maps,
    not only `{}` (an adapter that stopped every object at once would pass the test below)."""
    seen: set[str] = set()

    @settings(GENERATED, max_examples=40)
    @given(spec=_from_definition("PlacementSpec"))
    def draw(spec: dict[str, Any]) -> None:
        seen.update(key for key, value in spec.items() if value)

    draw()
    assert seen == {"device_map", "max_memory"}


@settings(GENERATED, max_examples=40)
@given(job=from_the_schema)
def test_generated_from_the_schema(job: Any) -> None:
    assert_agree(job)


edgy = st.sampled_from(["org/name", "/m", "./m", "~", "a", "A-b_c.d", "0" * 40, KEY, "nf4", "int8", "none",
                        "cpu", "cuda:0", "0", "30GiB", "1.5 kb", "x" * 97, "a\n", "\x00", "é", "", "auto"])
scalar = edgy | st.integers(-2, 2**64) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans() \
    | st.none() | st.text(max_size=6)
junk = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    edgy | st.text(max_size=4), inner, max_size=3), max_leaves=8)
field_names = ["kind", "model", "tenant", "dtype", "quantization", "placement", "adapters", "active_adapter",
               "trust_remote_code", "pin", "timeout_seconds", "model_key", "adapter", "name", "task",
               "args", "kwargs", "repo_id", "path", "revision", "method", "double_quant", "device_map",
               "max_memory", "load", "ref", "skip_modules", "compute_dtype", "int8_threshold"]
job_like = st.fixed_dictionaries({"kind": st.sampled_from(["load", "attach", "unload", "run"])},
                                 optional={name: junk for name in field_names if name != "kind"})


@GENERATED
@given(job=job_like)
def test_generated_job_like_dicts(job: dict[str, Any]) -> None:
    assert_agree_and_read_back(job)


@GENERATED
@given(job=st.sampled_from(README), data=st.data())
def test_generated_mutations_of_valid_jobs(job: dict[str, Any], data: st.DataObject) -> None:
    job = copy.deepcopy(job)
    target = job
    while True:  # walk down to a random dict inside the job, and change one of its fields
        keys = [k for k, v in target.items() if isinstance(v, dict)]
        if not keys or data.draw(st.booleans()):
            break
        target = target[data.draw(st.sampled_from(keys))]
    target[data.draw(st.sampled_from([*target, *field_names]))] = data.draw(junk)
    assert_agree_and_read_back(job)


# --- the document itself ------------------------------------------------------------------

def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in _refs(v)]
    return [r for v in node for r in _refs(v)] if isinstance(node, list) else []


def test_the_document_is_draft_2020_12_and_every_ref_resolves() -> None:
    Draft202012Validator.check_schema(DOC)
    assert DOC["$schema"] == "https://json-schema.org/draft/2020-12/schema" and "definitions" not in DOC
    resolver = Registry().with_resource(SCHEMA_ID, Resource.from_contents(DOC)).resolver(SCHEMA_ID)
    for ref in set(_refs(DOC)):
        assert ref.startswith("#/$defs/")
        resolver.lookup(ref)
    for name in ("LoadJob", "AttachAdapterJob", "UnloadJob", "RunJob", "JobRecord", "Event", "Envelope",
                 "ErrorInfo", "ErrorType", "RunResult", "WorkerInfo"):
        assert name in DOC["$defs"]


@pytest.mark.parametrize("name, job", [("LoadJob", {"model": "org/name"}),
                                       ("AttachAdapterJob", {"model_key": KEY, "adapter": "/a"}),
                                       ("UnloadJob", {"kind": "unload", "model_key": KEY}),
                                       ("RunJob", {"task": "a.b", "model": KEY})])
def test_each_kind_by_ref_through_a_referencing_registry(name: str, job: dict[str, Any]) -> None:
    registry = Registry().with_resource(SCHEMA_ID, Resource.from_contents(DOC))
    validator = Draft202012Validator({"$ref": f"{SCHEMA_ID}#/$defs/{name}"}, registry=registry)
    assert validator.is_valid(job)
    assert not validator.is_valid({**job, "tenant": "Bad Tenant"})


# --- error messages ---------------------------------------------------------------------

@pytest.mark.parametrize("job", [
    load(model=BIG), load(model="/" + BIG), load(model={"repo_id": BIG}), load(tenant=BIG), {"kind": BIG},
    load(**{BIG: 1}), run(kwargs={BIG: 1}), run(task=BIG), load(placement={"device_map": {BIG: 0}}),
    load(placement={"max_memory": {BIG: 1}}), load(adapters=[{"ref": "/a", "name": "bad name!"}] * 100_000),
    load(model=BIG + "\n"), json.dumps(load(model=BIG)), run(args=[BIG] * 3),
])
def test_errors_for_huge_input_are_short_and_escaped(job: Any) -> None:
    with pytest.raises(InvalidJob) as info:
        parse_job(job)
    assert len(info.value.message) < 1000 and "\n" not in info.value.message
    assert not info.value.retryable
