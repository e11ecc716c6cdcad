"""lm-evaluation-harness's `modelq` model: the harness's requests run as jobs on the pool.

    import tasks.harness  # registers "modelq" with lm-eval
    lm_eval.simple_evaluate(model="modelq", model_args="model_key=KEY", tasks=["hellaswag"])

or `python -m tasks.harness --model modelq --model_args pretrained=./folder --tasks hellaswag`
(lm-eval's own command line, with this model registered first), or `modelq eval`.

Requests go out in chunks of `batch_size` per run job (`modelq.loglikelihood`,
`modelq.loglikelihood_rolling`, `modelq.generate` in its generate_until mode), which compute
what lm-eval's `HFLM` computes. The chunks are spread over every live worker that holds the
model or, for a load spec, can load it (a worker with room for it): two jobs in flight per
worker, the next chunk going to whichever worker finishes first. A chunk whose worker went
away, or lost the model, runs again wherever routing sends it.

Producer side: no torch import of ours (lm-eval itself may import it: the `eval` extra).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lm_eval.models  # type: ignore[import-untyped]  # noqa: F401  (see below)
from lm_eval.api.model import LM  # type: ignore[import-untyped]
from lm_eval.api.registry import register_model  # type: ignore[import-untyped]

from schemas import JobStatus, LoadJob, RunJob, RunResult, WorkerInfo
from tasks.client import Client
from tasks.state.registry import request_key
from tasks.tenants import DEFAULT_TENANT

log = logging.getLogger(__name__)

# lm_eval.models is imported above for its side effect: it lists lm-eval's own models ("hf", ...)
# in the registry, which lm-eval does by itself only while the registry is empty; registering
# "modelq" first would hide them.

DEFAULT_CHUNK = 64
"""Requests per run job when `batch_size` is not a number."""
MAX_CHUNK_BYTES = 512 * 1024
"""A chunk's requests as JSON stay under this (a run job's arguments may be 1 MiB)."""
JOBS_PER_WORKER = 2
"""Jobs in flight per worker: one running, one queued behind it (or batched with it)."""
LOAD_FLAGS = ("revision", "dtype", "quant")
"""model_args that describe a load, beside `pretrained`."""
IGNORED = ("max_batch_size", "device")
"""What simple_evaluate passes every model that a pool has no use for."""


@register_model("modelq")
class ModelqLM(LM):  # type: ignore[misc]
    """The pool as an lm-eval model: a resident model (`model_key`) or one to load
    (`pretrained` folder or repo, with `revision`, `dtype`, `quant`; or `load`, a load job)."""

    def __init__(self, model_key: str | None = None, pretrained: str | None = None,
                 load: LoadJob | dict[str, Any] | None = None, adapter: str | None = None,
                 batch_size: int | str | None = None, client: Client | None = None,
                 **options: Any) -> None:
        super().__init__()
        self.client = client or Client()
        self.timeout = float(options.pop("timeout", 3600))
        self._tenant = options.pop("tenant", None)
        unknown = sorted(set(options) - set(LOAD_FLAGS) - set(IGNORED))
        if unknown:
            raise ValueError(f"model_args the modelq model does not take: {', '.join(unknown)} (it takes "
                             f"model_key, pretrained, {', '.join(LOAD_FLAGS)}, adapter, batch_size, "
                             "timeout, tenant)")
        self.target = _target(model_key, pretrained, load, options, self.tenant)
        self.adapters = None if adapter is None else [a for a in str(adapter).split("+") if a]
        self.chunk = int(str(batch_size)) if str(batch_size or "").isdigit() else DEFAULT_CHUNK

    @property
    def tenant(self) -> str:
        return str(self.client.settings.tenant or self._tenant or DEFAULT_TENANT)

    # --- the three kinds of request lm-eval makes ----------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [[str(r.args[0]), str(r.args[1])] for r in requests]
        rows = self._run("modelq.loglikelihood", pairs, lambda chunk: {"requests": chunk})
        results = [(float(row["logprob"]), bool(row["is_greedy"])) for row in rows]
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [str(r.args[0]) for r in requests]
        rows = self._run("modelq.loglikelihood_rolling", texts, lambda chunk: {"requests": chunk})
        results = [float(row["logprob"]) for row in rows]
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        results: list[str] = [""] * len(requests)
        for indices in groups.values():
            options = generation_options(requests[indices[0]].args[1])
            prompts = [str(requests[i].args[0]) for i in indices]
            texts = self._run("modelq.generate", prompts, _prompts_with(options))
            for index, text in zip(indices, texts, strict=True):
                results[index] = str(text)
                self.cache_hook.add_partial("generate_until", requests[index].args, results[index])
        return results

    # --- jobs ------------------------------------------------------------------------------

    def _run(self, task: str, items: Sequence[Any],
             kwargs: Callable[[list[Any]], dict[str, Any]]) -> list[Any]:
        """`task` over `items` in chunks, spread over the pool; one result per item, in order."""
        chunks = chunked(list(items), self.chunk)
        if not chunks:
            return []
        done: dict[int, list[Any]] = {}
        workers = self._workers(task)
        if not workers:  # nobody holds it yet: the first chunk loads it where routing says
            done[0] = self._job(task, kwargs(chunks[0]), None)
            workers = self._workers(task)
        waiting: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(len(chunks)):
            if index not in done:
                waiting.put(index)
        slots: list[str | None] = [w for w in workers for _ in range(JOBS_PER_WORKER)] or [None]
        lock, failed = threading.Lock(), threading.Event()

        def drain(worker: str | None) -> None:
            while not failed.is_set():  # one chunk failed: send no more
                try:
                    index = waiting.get_nowait()
                except queue.Empty:
                    return
                try:
                    values = self._job(task, kwargs(chunks[index]), worker)
                except BaseException:
                    failed.set()
                    raise
                with lock:
                    done[index] = values

        with ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="modelq-eval") as pool:
            for future in [pool.submit(drain, w) for w in slots]:
                future.result()
        return [value for index in range(len(chunks)) for value in done[index]]

    def _job(self, task: str, kwargs: dict[str, Any], worker: str | None) -> list[Any]:
        """One run job (on `worker`'s own queue, or where routing sends it): its list result.
        A job that failed because its worker went away or lost the model runs once more,
        routed."""
        job = RunJob.model_validate({"task": task, "model": self.target, "adapters": self.adapters,
                                     "kwargs": kwargs, "tenant": self.tenant})
        record = self.client.submit(job, worker=worker).wait(timeout=self.timeout)
        if record.status is not JobStatus.succeeded and worker is not None and _worth_rerouting(record):
            log.warning("job %s on worker %s %s; running its chunk again", record.job_id, worker,
                        record.status.value)
            record = self.client.submit(job).wait(timeout=self.timeout)
        if record.status is not JobStatus.succeeded or not isinstance(record.result, RunResult):
            why = record.error.message if record.error is not None else record.status.value
            raise RuntimeError(f"modelq job {record.job_id} ({task}) {record.status.value}: {why}")
        value = record.result.value
        if not isinstance(value, list):
            raise RuntimeError(f"modelq job {record.job_id} ({task}) returned {type(value).__name__}, "
                               "not a list")
        return value

    def _workers(self, task: str) -> list[str]:
        """The live workers that offer `task` and hold the model, or have room to load it."""
        pool = [w for w in self.client.workers() if w.offers(task)]
        key = self.target.get("model_key")
        if key is not None:
            return [w.name for w in pool if w.holds(key)]
        wanted = request_key(LoadJob.model_validate(self.target["load"]))
        sizes = [m.bytes for w in pool for m in w.models if wanted in m.request_keys]
        if not sizes:
            return []
        return [w.name for w in pool if _serves(w, wanted) or w.free_bytes >= max(sizes)]


def _prompts_with(options: dict[str, Any]) -> Callable[[list[Any]], dict[str, Any]]:
    return lambda chunk: {"prompts": chunk, **options}


def _serves(worker: WorkerInfo, wanted: str) -> bool:
    return any(wanted in m.request_keys for m in worker.models)


def _worth_rerouting(record: Any) -> bool:
    error = record.error
    return error is not None and (error.retryable or error.type in ("ModelNotFound", "WorkerLost",
                                                                    "InsufficientMemory"))


def _target(model_key: str | None, pretrained: str | None, load: LoadJob | dict[str, Any] | None,
            flags: dict[str, Any], tenant: str) -> dict[str, Any]:
    """The run jobs' `model`: {"model_key": KEY} or {"load": a load job's JSON}."""
    if sum(x is not None for x in (model_key, pretrained, load)) != 1:
        raise ValueError("name the model once: model_key=KEY (resident), pretrained=REF (loaded "
                         "first) or load=<a load job>")
    if model_key is not None:
        return {"model_key": str(model_key)}
    if load is None:
        from tasks.cli.jobs import load_spec

        spec = load_spec(str(pretrained), tenant, {k: v for k, v in flags.items() if k in LOAD_FLAGS})
        load = {k: v for k, v in spec.items() if k != "kind"}
    job = load if isinstance(load, LoadJob) else LoadJob.model_validate({**load, "tenant": tenant})
    return {"load": job.model_dump(mode="json", exclude={"kind"})}


def chunked(items: list[Any], size: int) -> list[list[Any]]:
    """`items` in runs of at most `size`, each under MAX_CHUNK_BYTES of JSON."""
    chunks: list[list[Any]] = []
    current: list[Any] = []
    weight = 0
    for item in items:
        cost = len(json.dumps(item, ensure_ascii=False).encode()) + 1
        if current and (len(current) >= size or weight + cost > MAX_CHUNK_BYTES):
            chunks.append(current)
            current, weight = [], 0
        current.append(item)
        weight += cost
    if current:
        chunks.append(current)
    return chunks


def generation_options(gen_kwargs: Any) -> dict[str, Any]:
    """lm-eval's generation kwargs as `modelq.generate` takes them (`until`, `max_gen_toks`,
    sampling); others are ignored, with a warning."""
    given = dict(gen_kwargs or {})
    until = given.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    tokens = next((given.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                   if given.get(k) is not None), 256)
    for k in ("max_gen_toks", "max_new_tokens", "max_tokens"):
        given.pop(k, None)
    temperature = float(given.pop("temperature", 0.0) or 0.0)
    do_sample = given.pop("do_sample", None)
    sample = bool(do_sample) if do_sample is not None else temperature > 0
    options: dict[str, Any] = {"until": [u for u in until if u], "max_gen_toks": int(tokens)}
    if sample:
        options.update(do_sample=True, temperature=temperature or 1.0)
        if given.get("top_p") is not None:
            options["top_p"] = float(given.pop("top_p"))
    if given:
        log.warning("modelq model: generation kwargs it does not take, ignored: %s", ", ".join(sorted(given)))
    return options


def main() -> None:
    """lm-eval's command line with the `modelq` model registered (`python -m tasks.harness`)."""
    from lm_eval.__main__ import cli_evaluate  # type: ignore[import-untyped]

    cli_evaluate()


if __name__ == "__main__":
    main()
