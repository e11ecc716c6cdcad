"""Quantize once: the second cold nf4 load (from this host's artifact) against quantizing on load.

Builds a ~250M-parameter llama (bfloat16 safetensors) in a temp folder, then
loads it with nf4 three ways, each in a fresh process so no load warms the next's
Python state (the OS page cache is warm for all, as on a worker host):
quantize on load, save the artifact, and load the artifact.

    python -m bench.artifacts
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TARGET = 10.0

_CHILD = r"""
import json, sys, time
from pathlib import Path
from schemas import LoadJob, ModelRef
from worker.models import loader
from worker.models.artifacts import Artifacts
from worker.jobs.progress import Reporter
from worker.models.resolve import resolve
folder, root, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
job = LoadJob(model=ModelRef(path=folder), quantization="nf4")
resolved = resolve(job.model)
artifacts = Artifacts(root)
artifact = artifacts.find(resolved.base.identity, job) if mode == "artifact" else None
started = time.perf_counter()
model = loader.load(resolved, job, "cpu", Reporter(lambda *_: None, lambda: False), artifact=artifact)
load_s = time.perf_counter() - started
save_s = None
if mode == "quantize":
    started = time.perf_counter()
    artifacts.save(model, resolved.base.identity, job)
    save_s = time.perf_counter() - started
print(json.dumps({"load_s": load_s, "save_s": save_s, "footprint": loader.footprint(model),
                  "from_artifact": artifact is not None}))
"""


def _build(folder: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return params


def _child(folder: Path, root: Path, mode: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(root), mode], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run() -> dict[str, Any]:
    """Seconds to quantize on load, to save the artifact, and to load it; the speedup."""
    with tempfile.TemporaryDirectory(prefix="modelq-artifacts-") as tmp:
        folder, root = Path(tmp) / "llama-250m", Path(tmp) / "artifacts"
        params = _build(folder)
        quantize = _child(folder, root, "quantize")
        artifact = _child(folder, root, "artifact")
    assert artifact["from_artifact"] and artifact["footprint"] == quantize["footprint"]
    return {"parameters": params, "quantize_load_s": round(quantize["load_s"], 2),
            "artifact_save_s": round(quantize["save_s"], 2),
            "artifact_load_s": round(artifact["load_s"], 2),
            "speedup": round(quantize["load_s"] / artifact["load_s"], 1), "target": TARGET}


def main() -> None:
    result = run()
    print(json.dumps(result, indent=2))
    print(f"second cold nf4 load {result['speedup']}x faster than quantizing on load "
          f"(target {TARGET:.0f}x): {'met' if result['speedup'] >= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
