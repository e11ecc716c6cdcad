"""What a user writes without modelq, in process: greedy generate and a LoRA training loop.

The baselines of generate_ratio and train_step_ratio, served by `python -m bench.inprocess`
(so they run in a warm process with the worker's thread settings). The model stays
resident between requests, as it does on a worker. The same work as the built-in tasks:
tokenize, `model.generate`, decode; and for training a LoRA from peft's LoraConfig, AdamW
on its parameters, right-padded batches with padding left out of the loss, batches drawn
from a seeded shuffle. Nothing here imports modelq.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_RESIDENT: dict[str, tuple[Any, Any]] = {}  # path -> (model, tokenizer), loaded once


def resident(path: str) -> tuple[Any, Any]:
    """The model at `path` (as the worker loads it: dtype from its config) and its tokenizer."""
    if path not in _RESIDENT:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True,
                                                     device_map="cpu").eval()
        _RESIDENT[path] = (model, AutoTokenizer.from_pretrained(path))
    return _RESIDENT[path]


def generate_once(path: str, prompt: str, tokens: int) -> tuple[float, str]:
    """Seconds for tokenize + greedy generate of `tokens` + decode, and the continuation."""
    model, tokenizer = resident(path)
    started = time.perf_counter()
    encoded = tokenizer(prompt, return_tensors="pt")
    start = encoded["input_ids"].shape[1]
    output = model.generate(**encoded, max_new_tokens=tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(output[0, start:], skip_special_tokens=True)
    return time.perf_counter() - started, str(text)


def train_steps(path: str, dataset: str, steps: int, batch_size: int, learning_rate: float,
                lora: dict[str, Any], max_length: int = 512, seed: int = 0) -> list[float]:
    """Train a LoRA (added on first call, kept after) for `steps`; seconds at the end of each step."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tokenizer = resident(path)
    if not isinstance(model, PeftModel):
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        _RESIDENT[path] = (model, tokenizer)
    texts = [json.loads(line)["text"] for line in Path(dataset).read_text().splitlines() if line.strip()]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    batches = _shuffled(len(texts), batch_size, seed)
    model.train()
    started = time.perf_counter()
    marks = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        batch = tokenizer([texts[i] for i in next(batches)], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        loss.item()  # logged each step, as anyone training does
        marks.append(time.perf_counter() - started)
    model.eval()
    return marks


def _shuffled(count: int, size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices: each pass over the examples in a seeded shuffle."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        while len(pending) < size:
            pending.extend(torch.randperm(count, generator=generator).tolist())
        yield pending[:size]
        pending = pending[size:]
