"""The `modelq` lm-eval model without a pool: chunks, generation options, arguments, and how it
spreads chunks over workers (a fake client); end to end it is tests/test_eval.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from schemas import JobStatus, RunResult

pytest.importorskip("lm_eval")

from lm_eval.api.registry import get_model  # noqa: E402

from tasks.harness import MAX_CHUNK_BYTES, ModelqLM, chunked, generation_options  # noqa: E402

KEY = "ab" * 16


class FakeClient:
    """Records which worker each job went to; each job's value is its items, transformed."""

    def __init__(self, workers: list[Any]) -> None:
        self.settings = SimpleNamespace(tenant=None)
        self._workers = workers
        self.sent: list[tuple[str | None, int]] = []
        self.fail = False
        self.lock = threading.Lock()

    def workers(self) -> list[Any]:
        return self._workers

    def submit(self, job: Any, worker: str | None = None) -> Any:
        items = job.kwargs.get("requests") or job.kwargs.get("prompts")
        with self.lock:
            self.sent.append((worker, len(items)))
        if job.task == "modelq.loglikelihood":
            value = [{"logprob": -float(len(c)), "is_greedy": len(c) == 1} for _, c in items]
        else:
            value = [f"{p}!" for p in items]
        record = SimpleNamespace(job_id="j", status=JobStatus.succeeded, error=None,
                                 result=RunResult.model_construct(value=value))
        if self.fail:
            error = SimpleNamespace(message="TaskFailed: boom", retryable=False, type="TaskFailed")
            record = SimpleNamespace(job_id="j", status=JobStatus.failed, error=error, result=None)
        return SimpleNamespace(wait=lambda timeout: time.sleep(0.05) or record)  # a job takes a while


def _worker(name: str, holds: bool) -> Any:
    return SimpleNamespace(name=name, offers=lambda task: True, holds=lambda key: holds, models=(),
                           free_bytes=0)


def test_the_model_is_registered_beside_lm_evals_own() -> None:
    assert get_model("modelq") is ModelqLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours first hides nothing


def test_requests_go_out_in_order_spread_over_the_workers_that_hold_the_model() -> None:
    client = FakeClient([_worker("w1", True), _worker("w2", True), _worker("w3", False)])
    lm = ModelqLM(model_key=KEY, batch_size=3, client=client)  # type: ignore[arg-type]
    requests = [SimpleNamespace(args=(f"context {i}", "x" * (1 + i % 4))) for i in range(20)]
    got = lm.loglikelihood(requests)
    assert got == [(-float(1 + i % 4), i % 4 == 0) for i in range(20)]
    assert sorted(n for _, n in client.sent) == [2] + [3] * 6
    assert {w for w, _ in client.sent} == {"w1", "w2"}  # never w3, which lacks the model


def test_a_failed_chunk_stops_the_evaluation_with_its_error() -> None:
    client = FakeClient([_worker("w1", True)])
    client.fail = True
    lm = ModelqLM(model_key=KEY, batch_size=1, client=client)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"modelq job j \(modelq.loglikelihood\) failed: TaskFailed: boom"):
        lm.loglikelihood([SimpleNamespace(args=("c", "x")) for _ in range(10)])
    assert len(client.sent) <= 2  # the two slots' first chunks; nothing after the failure


def test_generate_until_groups_requests_by_their_options() -> None:
    client = FakeClient([_worker("w1", True)])
    lm = ModelqLM(model_key=KEY, client=client)  # type: ignore[arg-type]
    requests = [SimpleNamespace(args=("a", {"until": ["\n"]})), SimpleNamespace(args=("b", {"until": ["."]})),
                SimpleNamespace(args=("c", {"until": ["\n"]}))]
    assert lm.generate_until(requests) == ["a!", "b!", "c!"]
    assert sorted(n for _, n in client.sent) == [1, 2]


def test_chunks_are_capped_by_count_and_by_bytes() -> None:
    assert chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    big = "x" * (MAX_CHUNK_BYTES // 3)
    assert [len(c) for c in chunked([big] * 5, 64)] == [2, 2, 1]


def test_generation_options_follow_lm_evals_kwargs(caplog: pytest.LogCaptureFixture) -> None:
    assert generation_options({"until": ["\n\n", ""], "do_sample": False}) == {"until": ["\n\n"],
                                                                               "max_gen_toks": 256}
    assert generation_options({"until": "Q:", "max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9}) == {
        "until": ["Q:"], "max_gen_toks": 9, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    generation_options({"until": [], "num_beams": 4})
    assert "num_beams" in caplog.text


@pytest.mark.parametrize("kwargs, message", [({}, "name the model once"),
                                             ({"model_key": KEY, "pretrained": "/m"}, "name the model once"),
                                             ({"model_key": KEY, "beams": 2}, "does not take: beams")])
def test_bad_model_args_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelqLM(client=FakeClient([]), **kwargs)  # type: ignore[arg-type]
