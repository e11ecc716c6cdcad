"""The in-process baseline: `from_pretrained` in a long-lived process, as a user would call it.

Run as `python -m bench.inprocess`: imports the model stack once, then answers
one JSON request per stdin line ({"path", "quant", "device"}) with one JSON line
({"seconds"}). A request that names an "adapter" times a PEFT user instead:
from_pretrained (bf16 or `quant`) + PeftModel.from_pretrained ("seconds"; the
from_pretrained alone: "base_seconds"), then load_adapter of the same adapter
under a second name ("second_adapter_seconds").
Models are freed between those requests. Requests with an "op" ("generate",
"train") run bench/by_hand.py's baselines on a model kept resident. The same
from_pretrained arguments as the worker's loader (dtype, safetensors only,
device_map, the same BitsAndBytesConfig), and no progress bars. `InProcess`
drives it from the bench.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

QUANTS = ("none", "nf4", "int8", "fp4")


def load_once(path: str, quant: str = "none", device: str = "cpu") -> float:
    """Seconds for one from_pretrained of `path` (bf16, or bitsandbytes `quant`)."""
    with _timed(device) as elapsed:
        model = _from_pretrained(path, quant, device)
    del model
    _free(device)
    return elapsed[0]


class AdapterTimes(NamedTuple):
    """Seconds of a PEFT user's load: base + adapter from scratch, and the adapter again beside it.

    scratch / second is the most an attach can save over a load from scratch on this
    machine, whatever a queue around it does: the ceiling of adapter_attach_speedup.
    """

    scratch: float  # from_pretrained + PeftModel.from_pretrained
    base: float  # the from_pretrained alone (part of `scratch`)
    second: float  # load_adapter of the same adapter under a second name


def adapter_once(path: str, adapter: str, device: str = "cpu", quant: str = "none") -> AdapterTimes:
    """Times base + adapter from scratch (bf16 or `quant`), then the same adapter again beside it."""
    from peft import PeftModel

    with _timed(device) as scratch:
        with _timed(device) as base:
            plain = _from_pretrained(path, quant, device)
        model = PeftModel.from_pretrained(plain, adapter, is_trainable=False)
    with _timed(device) as second:
        model.load_adapter(adapter, adapter_name="second", is_trainable=False)
    del model, plain
    _free(device)
    return AdapterTimes(scratch[0], base[0], second[0])


def _from_pretrained(path: str, quant: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from schemas import QuantizationSpec
    from schemas.specs import DType
    from worker.models.loader import bnb_config

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "use_safetensors": True, "device_map": device}
    if quant != "none":
        kwargs["quantization_config"] = bnb_config(QuantizationSpec(method=quant), DType.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


@contextmanager
def _timed(device: str) -> Iterator[list[float]]:
    """Seconds spent in the block (CUDA work included), in the yielded list once it ends."""
    import torch

    elapsed: list[float] = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    yield elapsed
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed.append(time.perf_counter() - started)


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def by_hand(request: dict[str, Any]) -> dict[str, Any]:
    """A generate or train request, answered by bench/by_hand.py."""
    from bench import by_hand as user

    if request["op"] == "generate":
        seconds, text = user.generate_once(request["path"], request["prompt"], request["tokens"])
        return {"seconds": seconds, "text": text}
    if request["op"] == "train":
        return {"marks": user.train_steps(request["path"], request["dataset"], request["steps"],
                                          request["batch_size"], request["learning_rate"],
                                          request["lora"])}
    raise ValueError(f"unknown op {request['op']!r}")


def serve(stdin: IO[str], stdout: IO[str]) -> None:
    from transformers.utils import logging as hf_logging

    from worker.celery_worker import import_model_stack

    import_model_stack()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    print(json.dumps({"ready": True}), file=stdout, flush=True)
    for line in stdin:
        request = json.loads(line)
        try:
            device = request.get("device", "cpu")
            reply: dict[str, Any]
            if request.get("op"):
                reply = by_hand(request)
            elif request.get("adapter"):
                times = adapter_once(request["path"], request["adapter"], device,
                                     request.get("quant", "none"))
                reply = {"seconds": times.scratch, "base_seconds": times.base,
                         "second_adapter_seconds": times.second}
            else:
                reply = {"seconds": load_once(request["path"], request.get("quant", "none"), device)}
            print(json.dumps(reply), file=stdout, flush=True)
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
        return float(self._ask({"path": str(path), "quant": quant, "device": device})["seconds"])

    def adapter(self, path: Path, adapter: Path, device: str = "cpu",
                quant: str = "none") -> AdapterTimes:
        """Base + adapter from scratch (and its from_pretrained), the adapter again beside it."""
        reply = self._ask({"path": str(path), "adapter": str(adapter), "device": device,
                           "quant": quant})
        return AdapterTimes(float(reply["seconds"]), float(reply["base_seconds"]),
                            float(reply["second_adapter_seconds"]))

    def generate(self, path: Path, prompt: str, tokens: int) -> tuple[float, str]:
        """Seconds for one greedy generate on the resident model at `path`, and its text."""
        reply = self._ask({"op": "generate", "path": str(path), "prompt": prompt, "tokens": tokens})
        return float(reply["seconds"]), str(reply["text"])

    def train(self, path: Path, dataset: Path, steps: int, batch_size: int, learning_rate: float,
              lora: dict[str, Any]) -> list[float]:
        """Seconds at the end of each of `steps` LoRA training steps (from the loop's start)."""
        reply = self._ask({"op": "train", "path": str(path), "dataset": str(dataset), "steps": steps,
                           "batch_size": batch_size, "learning_rate": learning_rate, "lora": lora})
        return [float(mark) for mark in reply["marks"]]

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

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the in-process baseline exited (code {self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the in-process baseline failed: {reply['error']}")
        return reply


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
