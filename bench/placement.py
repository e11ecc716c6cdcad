"""What resolving a device_map strategy before loading costs (worker/models/placement.py).

A load with `device_map="auto"` now builds the model on the meta device once more, before
from_pretrained does, to key the load by the map it resolves to. This prints that cost for
the tiny test model (beside its whole cold load) and for a Llama-2-7B-shaped config (no
weights: the resolution reads the config only), first call in this process and median.

    python -m bench.placement
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from schemas import LoadJob
from worker.jobs.progress import Reporter
from worker.models import loader
from worker.models.placement import strategy_map
from worker.models.resolve import Resolved, Source, resolve

LLAMA_2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "dtype": "float16", "tie_word_embeddings": False}


def _timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """Seconds of the first call and the median of the next `runs`."""
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times[0], statistics.median(times[1:])


def main() -> None:
    from tests.support.models import build_model

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_model("llama", Path(tmp) / "tiny")
        big = Path(tmp) / "llama7b"
        big.mkdir()
        (big / "config.json").write_text(json.dumps(LLAMA_2_7B))
        reporter = Reporter(lambda *_: None, lambda: False)
        tiny_job = LoadJob.model_validate({"model": str(tiny), "placement": {
            "device_map": "auto", "max_memory": {"cpu": "20GiB"}}})
        tiny_resolved = resolve(tiny_job.model)
        big_resolved = Resolved(base=Source(ref=str(big), path=big), config=LLAMA_2_7B)
        rows = [
            ("tiny: cold load (from_pretrained, auto)",
             _timed(lambda: loader.load(tiny_resolved, tiny_job, "cpu", reporter), 9)),
            ("tiny: resolve auto, cpu 20GiB",
             _timed(lambda: strategy_map(tiny_resolved, tiny_job, "cpu"), 9)),
        ]
        for budget in ("20GiB", "8GiB"):
            job = LoadJob.model_validate({"model": str(big), "placement": {
                "device_map": "auto", "max_memory": {"cpu": budget}}})
            mapping = strategy_map(big_resolved, job, "cpu")
            where = "/".join(sorted({str(d) for d in mapping.values()}))
            rows.append((f"7B config: resolve auto, cpu {budget} -> {where}",
                         _timed(lambda job=job: strategy_map(big_resolved, job, "cpu"), 5)))
    print(f"{'what':<52} {'first s':>9} {'median s':>9}")
    for name, (first, median) in rows:
        print(f"{name:<52} {first:>9.4f} {median:>9.4f}")


if __name__ == "__main__":
    main()
