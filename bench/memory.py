"""Memory really comes back: RSS over 50 load/unload cycles through the worker's own handlers.

Runs the worker's load and unload code (the load and unload handlers over a ModelCache) in this
process, on a ~55 MB float32 llama, plain and nf4, and compares RSS after each
unload with RSS after the first cycle (allocator arenas and imports warmed up).

    python -m bench.memory
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

CYCLES = 50
TARGET = 0.05


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run(cycles: int = CYCLES) -> dict[str, Any]:
    """RSS at the start (after one warm-up cycle), its peak after unloads, and the end."""
    from transformers.utils import logging as hf_logging

    from schemas import LoadJob, ModelRef, UnloadJob
    from tests.support.models import build_model
    from worker.handlers import local_handlers
    from worker.jobs.progress import Reporter
    from worker.models.cache import ModelCache

    hf_logging.disable_progress_bar()
    reporter = Reporter(lambda *_: None, lambda: False)
    handlers = local_handlers(ModelCache(2**32), name="bench")
    with tempfile.TemporaryDirectory(prefix="modelq-memory-") as tmp:
        folder = build_model("llama", Path(tmp) / "llama", hidden=512, layers=4, vocab=4096)
        jobs = [LoadJob(model=ModelRef(path=str(folder))),
                LoadJob(model=ModelRef(path=str(folder)), quantization="nf4")]

        def cycle(job: LoadJob) -> int:
            info = handlers["load"].run(job, reporter)
            loaded = _rss()
            handlers["unload"].run(UnloadJob(model_key=info.model_key), reporter)
            return loaded

        for job in jobs:
            cycle(job)
        start = _rss()
        after: list[int] = []
        loaded = 0
        for i in range(cycles):
            loaded = max(loaded, cycle(jobs[i % 2]))
            after.append(_rss())
    end = after[-1]
    return {"cycles": cycles, "start_rss": start, "loaded_rss_peak": loaded, "max_after_unload": max(after),
            "end_rss": end, "drift": (end - start) / start, "target": TARGET}


def main() -> None:
    r = run()
    mib = 2**20
    print(f"{r['cycles']} load/unload cycles (plain and nf4 alternating): "
          f"RSS start {r['start_rss'] / mib:.1f} MiB, "
          f"peak while loaded {r['loaded_rss_peak'] / mib:.1f} MiB, max after unload "
          f"{r['max_after_unload'] / mib:.1f} MiB, end {r['end_rss'] / mib:.1f} MiB, drift {r['drift']:+.2%} "
          f"(target within {TARGET:.0%}): {'met' if abs(r['drift']) <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
