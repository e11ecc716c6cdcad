"""The in-process baseline: `from_pretrained` in a long-lived process, as a user would call it.

Run as `python -m bench.inprocess`: imports the model stack once, then answers
one JSON request per stdin line ({"path", "quant", "device"}) with one JSON line
({"seconds"}). Models are freed between requests. The same from_pretrained
arguments as the worker's loader (dtype, safetensors only, device_map, the same
BitsAndBytesConfig), and no progress bars. `InProcess` drives it from the bench.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

QUANTS = ("none", "nf4", "int8", "fp4")


def load_once(path: str, quant: str = "none", device: str = "cpu") -> float:
    """Seconds for one from_pretrained of `path` (bf16, or bitsandbytes `quant`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from schemas import QuantizationSpec
    from schemas.specs import DType
    from worker.loader import bnb_config

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "use_safetensors": True, "device_map": device}
    if quant != "none":
        kwargs["quantization_config"] = bnb_config(QuantizationSpec(method=quant), DType.bfloat16)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return elapsed


def serve(stdin: IO[str], stdout: IO[str]) -> None:
    from transformers.utils import logging as hf_logging

    from worker.main import import_model_stack

    import_model_stack()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    print(json.dumps({"ready": True}), file=stdout, flush=True)
    for line in stdin:
        request = json.loads(line)
        try:
            seconds = load_once(request["path"], request.get("quant", "none"),
                                request.get("device", "cpu"))
            print(json.dumps({"seconds": seconds}), file=stdout, flush=True)
        except Exception as exc:  # reported to the driver, which stops the bench
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), file=stdout, flush=True)


class InProcess:
    """A `python -m bench.inprocess` subprocess: `load(path, quant)` returns its seconds."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self._log = open(log, "wb") if log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.inprocess"], cwd=cwd, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})
        self._read()

    def load(self, path: Path, quant: str = "none", device: str = "cpu") -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"path": str(path), "quant": quant, "device": device}) + "\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()  # type: ignore[union-attr]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the in-process baseline exited (code {self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"in-process from_pretrained failed: {reply['error']}")
        return reply


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
