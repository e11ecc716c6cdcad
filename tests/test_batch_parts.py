"""The parts of cross-job batches, each alone: which arguments may share a call, how a shared
result is cut back, which adapters peft may mix, and how a queued message is taken for a
batch (into kombu's unacked hash, on a real Redis) and acked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from schemas import LoadJob, ResultTooLarge, RunJob, TaskFailed
from tasks.client import Client
from tasks.state.keys import Keys
from tests.support.tenancy import send_raw
from worker.jobs.gather import Gatherer, job_message
from worker.modeltasks.joining import joined_arguments, mixable, split_args, split_values
from worker.modeltasks.registry import TaskContext, TaskSpec


def _generate(ctx: TaskContext, prompts: str | list[str], max_new_tokens: int = 32,
              stop: list[str] | None = None) -> list[str]:
    return []


SPEC = TaskSpec("acme.gen", _generate, batchable=True)


def test_jobs_share_a_call_only_with_equal_options() -> None:
    one = split_args(SPEC, ["a b"], {})
    two = split_args(SPEC, [], {"prompts": ["c", "d"], "max_new_tokens": 32})
    other = split_args(SPEC, [["e"]], {"max_new_tokens": 8})
    assert one is not None and two is not None and other is not None
    assert one.items == ["a b"] and two.items == ["c", "d"]  # a string is a list of one
    assert one.key == two.key != other.key  # defaults count as given
    assert split_args(SPEC, [], {"nope": 1}) is None  # does not bind: runs alone
    assert split_args(SPEC, [{"not": "a list"}], {}) is None
    args, kwargs = joined_arguments(SPEC, [one, two])
    assert args == [["a b", "c", "d"], 32, None] and kwargs == {}


def test_a_shared_result_is_cut_back_per_job() -> None:
    assert split_values(["x", "y", "z"], [1, 2], task="t", max_result_bytes=100) == [["x"],
                                                                                    ["y", "z"]]
    with pytest.raises(TaskFailed, match="returned 2 results for 3 items"):
        split_values(["x", "y"], [1, 2], task="t", max_result_bytes=100)
    parts = split_values(["x", "y" * 200], [1, 1], task="t", max_result_bytes=100)
    assert parts[0] == ["x"] and isinstance(parts[1], ResultTooLarge)


def test_which_adapters_peft_may_mix(models: dict[str, Path]) -> None:
    base: Any = AutoModelForCausalLM.from_pretrained(models["llama"])
    model: Any = PeftModel.from_pretrained(base, str(models["lora"]), adapter_name="a").eval()
    model.load_adapter(str(models["lora2"]), adapter_name="b")
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model.eval()
    assert mixable(model) == {"a", "b"}
    model.train()
    assert mixable(model) == set()
    model.eval()
    model.base_model.merge_adapter(["a"])
    assert mixable(model) == set()
    plain: Any = get_peft_model(AutoModelForCausalLM.from_pretrained(models["llama"]),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    assert mixable(plain.base_model.model) == set()  # not a PeftModel at all


def test_a_taken_message_sits_in_the_unacked_hash_until_acked(client: Client,
                                                              models: dict[str, Path]) -> None:
    keys = Keys()
    job = RunJob.model_validate({"task": "modelq.generate", "model": {"model_key": "ab" * 8},
                                 "args": [["hello"]]})
    queue = keys.queue()
    wanted = send_raw(client, job, queue)  # type: ignore[arg-type]
    send_raw(client, RunJob.model_validate({"task": "modelq.loglikelihood",  # type: ignore[arg-type]
                                            "model": {"model_key": "ab" * 8}, "args": [["x"]]}),
             queue)
    send_raw(client, LoadJob.model_validate({"model": str(models["llama"])}), queue)
    raws: list[bytes] = client.redis.lrange(queue, 0, -1)  # type: ignore[assignment]
    assert len(raws) == 3 and all(job_message(raw) is not None for raw in raws)
    gatherer = Gatherer(client.redis, keys, [queue])
    taken = gatherer.gather(lambda e: e.job.kind == "run" and e.job.task == "modelq.generate",
                            limit=5, wait=0)
    assert [t.envelope.job_id for t in taken] == [wanted]
    assert client.redis.llen(queue) == 2  # the others wait for Celery
    entry = json.loads(str(client.redis.hget(keys.unacked(), taken[0].tag), "utf-8"))  # type: ignore[arg-type]
    assert entry[0]["headers"]["id"] == wanted and entry[2] == queue  # as kombu writes it
    assert client.redis.zscore(keys.unacked_index(), taken[0].tag) is not None
    gatherer.ack(taken[0])
    assert client.redis.hlen(keys.unacked()) == 0 and client.redis.zcard(keys.unacked_index()) == 0
