"""The benchmark's surroundings: its own redis-server, worker processes and model folders.

Reuses the test support (a real redis-server, real `modelq worker` subprocesses,
tiny models and LoRA adapters) and adds the raw-Celery baseline workers and the
~250M model, built once under `.bench/` and reused. Every process started here is
stopped by `Bench.close()`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import redis

from bench import raw_celery
from bench.synth import SMALL_250M, Shape, write_model
from tasks.client import Client
from tasks.settings import Settings
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerPool

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench"
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Threads for every process that loads (worker and in-process baseline alike)."""


class Bench:
    """A redis-server, the modelq worker pool and raw Celery workers for one benchmark run."""

    def __init__(self, cache: Path = CACHE, artifact_dir: Path | None = None,
                 worker_env: dict[str, str] | None = None) -> None:
        self.cache = cache
        self.run_dir = cache / "run"
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        self.artifact_dir = artifact_dir or self.run_dir / "artifacts"
        self.redis = RedisServer(data_dir=self.run_dir / "redis").start()
        env = {**(worker_env or WORKER_ENV), "MODELQ_ARTIFACT_DIR": str(self.artifact_dir)}
        self.pool = WorkerPool(self.redis.url, self.run_dir, env=env)
        self.settings = Settings(redis_url=self.redis.url, heartbeat_seconds=0.5,
                                 worker_ttl_seconds=3, connect_timeout_seconds=5)
        self.client = Client(self.settings)
        self.raw: list[subprocess.Popen[bytes]] = []

    def start_raw(self, count: int, timeout: float = 90, model: Path | None = None) -> None:
        """Start `count` raw-Celery solo workers (each holding `model`, if given) and wait
        until each consumes."""
        env = {**os.environ, **WORKER_ENV, "BENCH_REDIS_URL": self.redis.url,
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if model is not None:
            env[raw_celery.MODEL_ENV] = str(model)
        for i in range(count):
            with open(self.run_dir / f"raw-{i}.log", "wb") as out:
                argv = [sys.executable, "-m", *raw_celery.command(f"raw{i}")]
                self.raw.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                 env=env, cwd=ROOT))
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.redis.url)
        while time.monotonic() < deadline:  # each solo worker shows up as one queue consumer
            if any(p.poll() is not None for p in self.raw):
                raise RuntimeError(f"a raw Celery worker exited; see {self.run_dir}/raw-*.log")
            clients = client.client_list()
            if sum(1 for c in clients if c.get("cmd") in ("brpop", "blpop")) >= count:
                return
            time.sleep(0.2)
        raise TimeoutError(f"raw Celery workers did not start; see {self.run_dir}/raw-*.log")

    def stop_raw(self) -> None:
        for proc in self.raw:
            proc.terminate()
        for proc in self.raw:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.raw.clear()

    def close(self) -> None:
        self.stop_raw()
        self.pool.stop_all()
        self.client.redis.close()
        self.redis.close()

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def big_model(cache: Path = CACHE, shape: Shape = SMALL_250M) -> Path:
    """The ~250M llama-shaped model, written once under `cache` and reused."""
    return write_model(shape, cache / "models" / "llama-250m", shard_bytes=2 * 1024**3)


def big_lora(base: Path, folder: Path | None = None) -> Path:
    """A rank-16 LoRA on q/k/v/o of the model at `base`, written once (beside it) and reused."""
    folder = folder or base.parent / f"{base.name}-lora"
    if (folder / "adapter_config.json").is_file() and \
            json.loads((folder / "adapter_config.json").read_text()).get(
                "base_model_name_or_path") == str(base):
        return folder
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * (
        hidden // config["num_attention_heads"])
    outputs = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    rank = 16
    tensors: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(7)
    for layer in range(layers):
        for proj, out in outputs.items():
            stem = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.01
            tensors[f"{stem}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "bias": "none", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "base_model_name_or_path": str(base), "inference_mode": True, "fan_in_fan_out": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))
    return folder


def variant(base: Path, tag: str) -> Path:
    """A folder that is `base` to the eye but a new model to every cache (a new path and config).

    Weights are hard links (beside `base`, so on its filesystem): the page cache is
    shared and nothing is copied; the config carries the tag, so the folder's
    fingerprint differs as well.
    """
    folder = base.parent / f"{base.name}.variants" / tag
    folder.mkdir(parents=True, exist_ok=True)
    for file in base.iterdir():
        if file.suffix == ".safetensors" or file.name.endswith(".index.json"):
            target = folder / file.name
            target.unlink(missing_ok=True)
            os.link(file, target)
    config = json.loads((base / "config.json").read_text())
    config["bench_variant"] = tag
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def variant_lora(lora: Path, base: Path) -> Path:
    """`lora` (hard-linked) with its adapter_config naming `base`, a variant folder."""
    folder = base.parent / f"{base.name}-lora"
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        os.link(lora / "adapter_model.safetensors", weights)
    config = json.loads((lora / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return folder
