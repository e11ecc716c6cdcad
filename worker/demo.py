"""`modelq demo`: the main job end to end on one machine, with no network.

Builds a small Llama and a LoRA adapter for it under `<home>/demo` (once), finds a
pool (a live `modelq up`, or a Redis with live workers) or starts `modelq up` itself
and stops it afterwards, then loads the model in nf4, attaches the adapter, shows
progress live and prints the result. It talks to the pool only through the Client,
like any producer; torch is needed here only to build the demo model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from schemas import AttachAdapterJob, JobRecord, JobStatus, LoadJob, ModelRef, QuantizationSpec
from tasks import render
from tasks.client import Client
from tasks.embedded import read_state
from tasks.settings import Settings
from tasks.watch import follow_with_bar

DEMO_SEED = 7


def build_demo(folder: Path) -> tuple[Path, Path]:
    """A small Llama (safetensors) and a LoRA adapter trained 'on' it; built once, reused."""
    model_dir, adapter_dir, done = folder / "model", folder / "lora", folder / ".built"
    if done.exists():
        return model_dir, adapter_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    print(f"building a demo model and LoRA adapter in {folder} ...", flush=True)
    hf_logging.disable_progress_bar()
    torch.manual_seed(DEMO_SEED)
    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    base = LlamaForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    with torch.no_grad():  # peft starts lora_B at zero: make the adapter change something
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(mean=0.0, std=0.02)
    peft_model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
    done.touch()
    return model_dir, adapter_dir


class _Pool:
    """The pool the demo uses: one that runs already, or a `modelq up` it started."""

    def __init__(self, settings: Settings, timeout: float) -> None:
        self.settings = settings
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = settings.home / "demo" / "up.log"

    def __enter__(self) -> Client:
        client = Client(self.settings)
        try:
            if client.workers():
                return client
        except Exception as exc:  # redis.ConnectionError and kin
            if self.settings.redis_configured:
                where = self.settings.redis_url.rsplit("@", 1)[-1]  # never print a password
                raise RuntimeError(f"Redis at {where} is unreachable ({type(exc).__name__}): start "
                                   "it, or unset MODELQ_REDIS_URL to use the embedded one") from exc
        print("starting modelq up (embedded Redis and a worker) ...", flush=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "up"], stdout=out,
                                         stderr=subprocess.STDOUT,
                                         env={**os.environ, "MODELQ_HOME": str(self.settings.home)})
        return self._wait_ready()

    def _wait_ready(self) -> Client:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        client: Client | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"modelq up exited ({self.proc.returncode}):\n{self._tail()}")
            if client is None:
                state = read_state(self.settings.home)
                if state is not None:
                    client = Client(self.settings.model_copy(update={"redis_url": state.redis_url}))
            elif client.workers():
                return client
            time.sleep(0.2)
        raise TimeoutError(f"no worker came up within {self.timeout:.0f}s:\n{self._tail()}")

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def __exit__(self, *_: Any) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _follow(client: Client, job: LoadJob | AttachAdapterJob, title: str, timeout: float) -> JobRecord:
    handle = client.submit(job)
    render.console().print(f"[bold]{title}[/bold]  job {handle.job_id}")
    return follow_with_bar(client, handle.job_id, timeout)


def run_demo(settings: Settings, *, model: str | None = None, adapter: str | None = None,
             quant: str = "nf4", timeout: float = 600.0) -> int:
    """Load a model in `quant`, attach an adapter, print the result; 0 when both succeeded."""
    if model is None:
        model_dir, adapter_dir = build_demo(settings.home / "demo")
        model, adapter = str(model_dir), str(adapter_dir)
    with _Pool(settings, timeout) as client:
        record = _follow(client, LoadJob(model=ModelRef(path=model),
                                         quantization=QuantizationSpec(method=quant)),
                         f"load {model} ({quant})", timeout)
        if record.status is JobStatus.succeeded and adapter is not None and record.result is not None:
            record = _follow(client, AttachAdapterJob(model_key=record.result.model_key,
                                                      adapter=ModelRef(path=adapter), name="demo"),
                             f"attach {adapter}", timeout)
    render.console().print(render.record_table(record))
    return 0 if record.status is JobStatus.succeeded else 1
