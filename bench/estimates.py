"""Estimate error table: predicted bytes (worker/models/estimate.py) against the loaded footprint.

For three architectures (llama, qwen2 with biases and tied embeddings, sharded
mistral), every dtype and bitsandbytes setting, with and without a LoRA adapter,
loads the model on the CPU and compares `estimate()` with `loader.footprint()`.

    python -m bench.estimates
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any

QUANTS: list[dict[str, Any]] = [
    {"method": "none"}, {"method": "int8"}, {"method": "nf4"}, {"method": "nf4", "double_quant": True},
    {"method": "fp4"}, {"method": "fp4", "double_quant": True},
    {"method": "nf4", "skip_modules": ["lm_head", "down_proj"]},
]
DTYPES = ["auto", "bfloat16", "float16"]
TARGET = 0.05


def _build(root: Path) -> dict[str, tuple[Path, Path]]:
    from tests.support.models import build_lora, build_model

    sizes = {"hidden": 256, "layers": 4, "vocab": 2048}
    out = {}
    for kind, extra in (("llama", {}), ("qwen2", {"tie": True}), ("mistral", {"sharded": True})):
        model = build_model(kind, root / kind, **sizes, **extra)  # type: ignore[arg-type]
        out[kind] = (model, build_lora(model, root / f"{kind}-lora", r=8))
    return out


def run() -> list[dict[str, Any]]:
    """One row per (architecture, dtype, quantization, adapter): estimate, actual, error."""
    from transformers.utils import logging as hf_logging

    from schemas import AdapterSpec, LoadJob, ModelRef
    from worker.jobs.progress import Reporter
    from worker.models import adapters as peft_adapters
    from worker.models import loader
    from worker.models.estimate import estimate
    from worker.models.resolve import fetch, resolve

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rows: list[dict[str, Any]] = []
    reporter = Reporter(lambda *_: None, lambda: False)
    with tempfile.TemporaryDirectory(prefix="modelq-bench-") as tmp:
        for kind, (folder, lora) in _build(Path(tmp)).items():
            for dtype in DTYPES:
                for quant in QUANTS:
                    job = LoadJob(model=ModelRef(path=str(folder)), dtype=dtype, quantization=quant,
                                  adapters=(AdapterSpec(ref=str(lora)),))
                    resolved = resolve(job.model)
                    model = loader.load(resolved, job, "cpu", reporter)
                    base_actual = loader.footprint(model)
                    base_est = estimate(resolved.base.path, resolved.config, job)
                    model = peft_adapters.attach(model, fetch(job.adapters[0].ref), "default")
                    full_actual = loader.footprint(model)
                    full_est = estimate(resolved.base.path, resolved.config, job, [lora])
                    label = quant["method"] + ("+dq" if quant.get("double_quant") else "") + \
                        ("+skip" if quant.get("skip_modules") else "")
                    pairs = (("-", base_est, base_actual), ("lora", full_est, full_actual))
                    for adapter, est, actual in pairs:
                        rows.append({"arch": kind, "dtype": dtype, "quant": label, "adapter": adapter,
                                     "estimated": est, "actual": actual,
                                     "error": (est - actual) / actual})
                    del model
                    gc.collect()
    return rows


def main() -> None:
    rows = run()
    print(f"{'arch':8} {'dtype':9} {'quant':12} {'adapter':7} {'estimated':>11} {'actual':>11} {'error':>8}")
    for r in rows:
        print(f"{r['arch']:8} {r['dtype']:9} {r['quant']:12} {r['adapter']:7} {r['estimated']:>11,} "
              f"{r['actual']:>11,} {r['error']:>+8.2%}")
    worst = max(abs(r["error"]) for r in rows)
    print(f"{len(rows)} combinations; worst error {worst:.2%} (target {TARGET:.0%}): "
          f"{'met' if worst <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
