"""`modelq demo`: the main job end to end on one machine, with no network.

Builds a small Llama with its own tokenizer and a LoRA adapter for it under
`<home>/demo` (once), finds a pool (a live `modelq up`, or a Redis with live
workers) or starts `modelq up` itself and stops it afterwards, then: loads the
model in nf4, attaches the adapter, generates with and without it, trains a fresh
adapter for a few steps on a handful of bundled lines, saves it and attaches the
saved folder. It talks to the pool only through the Client, like any producer;
torch and tokenizers are needed here only to build the demo model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import (
    AttachAdapterJob,
    JobRecord,
    JobStatus,
    LoadJob,
    ModelInfo,
    ModelRef,
    QuantizationSpec,
    QuantMethod,
    RunResult,
)
from tasks.cli import render
from tasks.cli.watch import follow_with_bar
from tasks.client import Client
from tasks.embedded import read_state
from tasks.settings import Settings

DEMO_SEED = 7
BUILT_MARKER = ".built-v2"  # v2: the model folder carries a tokenizer (v1 folders are rebuilt)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3: pad, bos, eos, unk, as in the config
DEMO_ADAPTER = "demo"
PROMPT = "the worker"
NEW_TOKENS = 10
TRAIN_STEPS = 20
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
TRAIN = {"steps": TRAIN_STEPS, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32, "seed": 0}

# The tokenizer's words and the training data: any prompt made of these words encodes without <unk>.
DEMO_LINES = (
    "the queue holds the jobs and the worker takes them one at a time",
    "the worker loads the model once and keeps it warm for the next job",
    "an adapter is a small set of weights trained on top of a frozen base",
    "the base stays in four bits while the adapter learns in full precision",
    "every job ends in a record that says what happened and why",
    "a producer never waits on the worker it reads the record",
    "the model answers the prompt and the adapter changes the answer",
    "train the adapter then save it and attach it to the model again",
)


@dataclass(frozen=True)
class DemoFolder:
    """What `build_demo` leaves under `<home>/demo`."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def adapter(self) -> Path:
        return self.root / "lora"

    @property
    def dataset(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def trained(self) -> Path:
        return self.root / "trained"


def build_tokenizer(folder: Path) -> int:
    """A word-level tokenizer trained on DEMO_LINES, saved in `folder`; its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(DEMO_LINES, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 1)])
    backend.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(str(folder))
    return int(backend.get_vocab_size())


def build_demo(root: Path) -> DemoFolder:
    """A small Llama (safetensors) with its tokenizer, a LoRA adapter 'trained' on it, and a
    JSON-lines dataset; built once, reused."""
    demo = DemoFolder(root)
    if (root / BUILT_MARKER).exists():
        return demo
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    print(f"building a demo model, tokenizer and LoRA adapter in {root} ...", flush=True)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calling deprecated transformers API
    torch.manual_seed(DEMO_SEED)
    vocab = build_tokenizer(demo.model)
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(demo.model)
    base = LlamaForCausalLM.from_pretrained(demo.model)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    peft_model.peft_config["default"].base_model_name_or_path = str(demo.model)
    with torch.no_grad():  # peft starts lora_B at zero: make the adapter change something
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(mean=0.0, std=0.2)
    peft_model.save_pretrained(str(demo.adapter), save_embedding_layers=False)
    demo.dataset.write_text("".join(json.dumps({"text": line}) + "\n" for line in DEMO_LINES))
    (root / BUILT_MARKER).touch()
    return demo


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


class DemoFailed(Exception):
    """A demo step's job did not succeed; carries its record."""

    def __init__(self, record: JobRecord) -> None:
        super().__init__(record.job_id)
        self.record = record


class _Steps:
    """The demo's jobs, one after another, on one client; each must succeed."""

    def __init__(self, client: Client, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self.console = render.console()

    def follow(self, job: LoadJob | AttachAdapterJob, title: str) -> tuple[JobRecord, ModelInfo]:
        """Submit `job` and show its progress; its record and the model it left."""
        handle = self.client.submit(job)
        self.console.print(f"[bold]{title}[/bold]  job {handle.job_id}")
        record = self.check(follow_with_bar(self.client, handle.job_id, self.timeout))
        assert isinstance(record.result, ModelInfo)
        return record, record.result

    def run(self, task: str, key: str, adapters: list[str] | None = None, **kwargs: Any) -> Any:
        """Run `task` on the model `key`, waiting quietly; its value."""
        record = self.client.run(task, model=key, adapters=adapters, kwargs=kwargs).wait(self.timeout)
        return self.value(record)

    def value(self, record: JobRecord) -> Any:
        """A run job's value; DemoFailed unless it succeeded."""
        self.check(record)
        assert isinstance(record.result, RunResult)
        return record.result.value

    def check(self, record: JobRecord) -> JobRecord:
        if record.status is not JobStatus.succeeded or record.result is None:
            raise DemoFailed(record)
        return record

    def generate(self, key: str, adapters: list[str], label: str) -> None:
        (text,) = self.run("modelq.generate", key, adapters, prompts=PROMPT, max_new_tokens=NEW_TOKENS)
        self.console.print(f"  {label:<24} {PROMPT} [cyan]{text}[/cyan]", highlight=False)

    def train(self, key: str, held: tuple[str, ...], demo: DemoFolder) -> str:
        """Add a fresh adapter, train it on the bundled lines, save it; its name."""
        name = fresh_name(held)
        added = self.run("modelq.add_adapter", key, name=name, config=LORA)
        self.console.print(f"[bold]add adapter {name}[/bold]  LoRA r={LORA['r']} on every linear layer, "
                           f"{added['trainable_parameters']:,} parameters")
        handle = self.client.run("modelq.train_adapter", model=key, kwargs={
            "adapter": name, "dataset": str(demo.dataset), "output_dir": str(demo.trained), **TRAIN})
        self.console.print(f"[bold]train {name}[/bold]  {TRAIN_STEPS} steps on {demo.dataset}  "
                           f"job {handle.job_id}")
        trained = self.value(follow_with_bar(self.client, handle.job_id, self.timeout))
        losses = trained["losses"]
        trend = "went down" if losses[-1] < losses[0] else "did not go down"
        self.console.print(f"  loss by step: {' '.join(f'{loss:.2f}' for loss in losses)}\n"
                           f"  loss {losses[0]:.3f} -> {losses[-1]:.3f} ({trend}), "
                           f"saved to {trained['output_dir']}", highlight=False)
        return name


def fresh_name(held: tuple[str, ...]) -> str:
    """'fresh', or 'fresh-2', ... when the model holds one already (a pool that stays up)."""
    return next(n for n in (f"fresh{'' if i == 1 else f'-{i}'}" for i in range(1, 1000))
                if n not in held and f"{n}-trained" not in held)


def name_base(adapter_dir: Path, model: str) -> None:
    """Point a saved adapter at the model folder it was trained on.

    A worker that loaded the base from its quantized artifact saves the artifact's
    folder as `base_model_name_or_path`, and attaching the adapter to the model
    loaded from `model` is then refused (AdapterIncompatible).
    """
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if config.get("base_model_name_or_path") != model:
        config["base_model_name_or_path"] = model
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _steps(steps: _Steps, demo: DemoFolder, model: str, adapter: str | None, quant: str) -> JobRecord:
    quantization = QuantizationSpec(method=QuantMethod(quant))
    _, info = steps.follow(LoadJob(model=ModelRef(path=model), quantization=quantization),
                           f"load {model} ({quant})")
    key = info.model_key
    with_adapter: list[str] = []
    if adapter is not None:
        _, info = steps.follow(AttachAdapterJob(model_key=key, adapter=ModelRef(path=adapter),
                                                name=DEMO_ADAPTER), f"attach {adapter}")
        with_adapter = [DEMO_ADAPTER]
    steps.console.print(f"[bold]generate[/bold]  {NEW_TOKENS} tokens, greedy")
    steps.generate(key, [], "base alone:")
    if with_adapter:
        steps.generate(key, with_adapter, f"with adapter {DEMO_ADAPTER}:")
    name = steps.train(key, info.adapters, demo)
    name_base(demo.trained, model)
    record, _ = steps.follow(AttachAdapterJob(model_key=key, adapter=ModelRef(path=str(demo.trained)),
                                           name=f"{name}-trained"), f"attach {demo.trained}")
    steps.generate(key, [f"{name}-trained"], f"with {name}-trained:")
    return record


def run_demo(settings: Settings, *, model: str | None = None, adapter: str | None = None,
             quant: str = "nf4", timeout: float = 600.0) -> int:
    """Load a model in `quant`, attach an adapter, generate, train, save and attach a new one;
    print what each step did and the last record. 0 when every step succeeded."""
    demo = build_demo(settings.home / "demo")
    if model is None:
        model, adapter = str(demo.model), str(demo.adapter)
    with _Pool(settings, timeout) as client:
        try:
            record = _steps(_Steps(client, timeout), demo, model, adapter, quant)
        except DemoFailed as failed:
            record = failed.record
    render.console().print(render.record_table(record))
    return 0 if record.status is JobStatus.succeeded else 1
