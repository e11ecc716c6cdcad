"""`python -m bench.batching [--jobs N] [--runs R] [--json PATH]`: cross-job batches, measured.

* batched_generate_speedup: N one-prompt `modelq.generate` jobs (TOKENS new tokens, greedy)
  submitted at once to one worker, wall time from the first submit to the last result,
  with batching off (MODELQ_BATCH_MAX_JOBS=1) ÷ on (the defaults);
* batched_generate_ratio: the same N jobs through modelq (batching on) ÷ one in-process
  `model.generate` of the N prompts as one left-padded batch;
* mixed_adapter_batch_ratio: N jobs spread over 4 LoRA adapters ÷ N jobs on one of them;
* batch_wait_added_ms: p50 round trip of a lone generate job with batching on − off (the
  batch's wait for company, MODELQ_BATCH_WAIT_MS, is what it may add).

The model is MID: a llama of ~97M float32 parameters (random weights, bench/synth.py, a
word-level tokenizer from tests/support/models.py), large enough that a decode step is
matrix work rather than Python. Workers and the in-process side run one thread each
(bench/env.py WORKER_ENV). Figures on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.env import CACHE, WORKER_ENV, Bench, big_lora
from bench.figures import Figure, Report
from bench.synth import Shape, write_model
from schemas import JobStatus, LoadJob, RunResult
from tasks.client import JobHandle
from tests.support.models import TOKENIZER_LINES, build_tokenizer

log = logging.getLogger("bench.batching")

MID = Shape(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048, vocab=8000)
"""~97M parameters (390 MB in float32): a decode step is matrix work, not Python overhead."""

TOKENS = 32
ADAPTERS = ("a0", "a1", "a2", "a3")
WORDS = " ".join(TOKENIZER_LINES).split()


def figures() -> list[Figure]:
    return [Figure("batched_generate_speedup", 5, ">="),
            Figure("batched_generate_ratio", 1.3, "<="),
            Figure("mixed_adapter_batch_ratio", 2.0, "<="),
            Figure("batch_wait_added_ms", None, "<=", unit="ms")]


def mid_model(cache: Path = CACHE) -> tuple[Path, list[Path]]:
    """The MID model with a tokenizer and 4 rank-16 LoRAs, written once under `cache`."""
    folder = write_model(MID, cache / "models" / "llama-97m")
    if not (folder / "tokenizer.json").is_file():
        build_tokenizer(folder, vocab=MID.vocab)
    return folder, [big_lora(folder, cache / "models" / f"llama-97m-lora-{i}") for i in range(4)]


def prompts(count: int) -> list[str]:
    return [" ".join(WORDS[i % 40:i % 40 + 4 + i % 5]) for i in range(count)]


def load_job(model: Path, loras: list[Path]) -> LoadJob:
    return LoadJob.model_validate({"model": str(model), "dtype": "float32", "adapters": [
        {"ref": str(lora), "name": name} for lora, name in zip(loras, ADAPTERS, strict=True)]})


def wall(bench: Bench, key: str, texts: list[str], adapters: list[str | None]) -> tuple[float, int]:
    """Seconds from the first submit to the last result of one job per text; the largest
    batch any of them ran in."""
    started = time.perf_counter()
    handles = [_generate(bench, key, text, adapter) for text, adapter in zip(texts, adapters,
                                                                                strict=True)]
    results = [_result(handle) for handle in handles]
    return time.perf_counter() - started, max(r.batch_jobs for r in results)


def lone_p50_ms(bench: Bench, key: str, count: int) -> float:
    trips = []
    for i in range(count):
        started = time.perf_counter()
        _result(_generate(bench, key, prompts(count)[i], None))
        trips.append(time.perf_counter() - started)
    return statistics.median(trips) * 1000


def _generate(bench: Bench, key: str, text: str, adapter: str | None) -> JobHandle:
    return bench.client.run("modelq.generate", model=key, args=[text],
                            adapters=[] if adapter is None else [adapter],
                            kwargs={"max_new_tokens": TOKENS})


def _result(handle: JobHandle) -> RunResult:
    record = handle.wait(timeout=600)
    if record.status is not JobStatus.succeeded or not isinstance(record.result, RunResult):
        raise RuntimeError(f"job {handle.job_id} ended {record.status.value}: {record.error}")
    return record.result


def worker_side(bench: Bench, model: Path, loras: list[Path], *, jobs: int, runs: int,
                batching: bool) -> dict[str, Any]:
    """One worker, batching on or off: the N-job wall times, mixed and one-adapter walls, and
    lone round trips."""
    name = "on" if batching else "off"
    worker = bench.pool.start(name, env={} if batching else {"MODELQ_BATCH_MAX_JOBS": "1"},
                              timeout=180)
    try:
        loaded = bench.client.submit(load_job(model, loras)).wait(timeout=600)
        key = loaded.result.model_key  # type: ignore[union-attr]
        texts = prompts(jobs)
        _result(_generate(bench, key, texts[0], None))  # warm: tokenizer, first forward
        found: dict[str, Any] = {"wall": [], "mixed": [], "one": [], "largest_batch": 0}
        for run in range(runs):
            seconds, largest = wall(bench, key, texts, [None] * jobs)
            found["wall"].append(seconds)
            found["largest_batch"] = max(found["largest_batch"], largest)
            log.info("%s run %d: %d jobs in %.2fs (largest batch %d)", name, run, jobs, seconds,
                     largest)
            if batching:
                found["mixed"].append(wall(bench, key, texts,
                                           [ADAPTERS[i % 4] for i in range(jobs)])[0])
                found["one"].append(wall(bench, key, texts, [ADAPTERS[0]] * jobs)[0])
        found["lone_p50_ms"] = lone_p50_ms(bench, key, 9)
        return found
    finally:
        worker.terminate()


def in_process(model: Path, jobs: int, runs: int) -> list[float]:
    """Seconds of one left-padded `model.generate` of the N prompts, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(WORKER_ENV["OMP_NUM_THREADS"]))
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    llm: Any = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    batch = tokenizer(prompts(jobs), return_tensors="pt", padding=True)
    out = []
    for _ in range(runs + 1):  # the first warms up
        started = time.perf_counter()
        with torch.no_grad():
            llm.generate(**batch, max_new_tokens=TOKENS, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
        out.append(time.perf_counter() - started)
    return out[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__)
    parser.add_argument("--jobs", type=int, default=32, help="jobs submitted at once (default 32)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each wall time (default 2)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    report = Report(figures(), context={
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
        "load_average": os.getloadavg(), "jobs": args.jobs, "runs": args.runs,
        "tokens": TOKENS, "model": f"llama {MID.parameters() / 1e6:.0f}M float32, 4 LoRA r16"})
    model, loras = mid_model()
    with Bench() as bench:
        on = worker_side(bench, model, loras, jobs=args.jobs, runs=args.runs, batching=True)
        off = worker_side(bench, model, loras, jobs=args.jobs, runs=args.runs, batching=False)
    here = in_process(model, args.jobs, args.runs)
    report.figure("batched_generate_speedup").add(*(o / n for o, n in zip(off["wall"], on["wall"],
                                                                           strict=True)))
    report.figure("batched_generate_ratio").add(*(n / h for n, h in zip(on["wall"], here,
                                                                         strict=True)))
    report.figure("mixed_adapter_batch_ratio").add(*(m / o for m, o in zip(on["mixed"], on["one"],
                                                                            strict=True)))
    wait_ms = float(os.environ.get("MODELQ_BATCH_WAIT_MS", "10"))
    added = report.figure("batch_wait_added_ms")
    added.target = wait_ms + 2
    added.add(on["lone_p50_ms"] - off["lone_p50_ms"])
    added.note = f"lone p50 {on['lone_p50_ms']:.0f} ms on, {off['lone_p50_ms']:.0f} ms off"
    report.figure("batched_generate_speedup").note = (
        f"{statistics.median(off['wall']):.2f}s off, {statistics.median(on['wall']):.2f}s on "
        f"(largest batch {on['largest_batch']})")
    report.figure("batched_generate_ratio").note = f"in process {statistics.median(here):.2f}s"
    report.context.update(on=on, off=off, in_process=here)
    print(report.table())
    if args.json:
        report.write_json(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
