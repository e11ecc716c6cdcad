"""Random llama-shaped checkpoints written straight to disk, for benchmarks only.

Owns the shapes of the benchmark models (a ~250M model for this machine, a ~7B
one for a GPU host) and writing them as safetensors shards from random tensors,
one shard at a time, so a 7B checkpoint never sits in memory whole. Tensor names
and shapes come from the transformers class built on the meta device, so they
always match what `from_pretrained` expects. Nothing here knows modelq.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

POOL_ELEMENTS = 1 << 24  # random values reused across tensors: fills run at copy speed


@dataclass(frozen=True)
class Shape:
    """A llama-shaped model's sizes."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    def config(self) -> dict[str, object]:
        """config.json of a LlamaForCausalLM with these sizes, saved in bfloat16."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.intermediate, "vocab_size": self.vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every weight, in the order the model declares them."""
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**self.config()))
        return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]

    def parameters(self) -> int:
        return sum(_numel(shape) for _, shape in self.tensors())


SMALL_250M = Shape(hidden=1024, layers=16, heads=16, kv_heads=16, intermediate=2560, vocab=32000)
"""~258.5M parameters (517 MB in bf16): the CPU benchmark model."""

LLAMA_7B = Shape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
"""Llama-2-7B's shape: ~6.74B parameters (13.5 GB in bf16)."""

TINY = Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256)
"""For tests of this module: a few hundred kB."""


def write_model(shape: Shape, folder: Path, *, shard_bytes: int = 5 * 1024**3,
                seed: int = 0) -> Path:
    """Write config.json and bf16 safetensors shards of random weights; returns `folder`.

    Idempotent: a folder already holding a complete model of this shape is reused
    (`complete` checks the config and that every shard exists).
    """
    from safetensors.torch import save_file

    if complete(shape, folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.safetensors"):
        stale.unlink()
    groups = list(_shards(shape.tensors(), shard_bytes))
    names = _shard_names(len(groups))
    pool = _pool(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for index, (group, file_name) in enumerate(zip(groups, names, strict=True)):
        tensors = {name: _fill(name, shape_, pool, offset=index * 7919 + i * 104729)
                   for i, (name, shape_) in enumerate(group)}
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file_name for name, _ in group})
        log.info("wrote %s (%d tensors)", file_name, len(group))
        del tensors
    if len(names) > 1:
        index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=1))
    # config.json last: its presence with every shard marks a complete folder
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=1))
    return folder


def complete(shape: Shape, folder: Path) -> bool:
    """True when `folder` holds a model of `shape` with all of its shards."""
    config = folder / "config.json"
    if not config.is_file() or json.loads(config.read_text()) != shape.config():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = set(json.loads(index.read_text())["weight_map"].values())
        return all((folder / f).is_file() for f in files)
    return (folder / "model.safetensors").is_file()


def bytes_of(shape: Shape, bytes_per_param: int = 2) -> int:
    return shape.parameters() * bytes_per_param


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _shards(tensors: list[tuple[str, tuple[int, ...]]],
            shard_bytes: int) -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    group: list[tuple[str, tuple[int, ...]]] = []
    size = 0
    for name, shape in tensors:
        nbytes = _numel(shape) * 2
        if group and size + nbytes > shard_bytes:
            yield group
            group, size = [], 0
        group.append((name, shape))
        size += nbytes
    if group:
        yield group


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _pool(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(POOL_ELEMENTS, generator=generator) * 0.02).to(torch.bfloat16)


def _fill(name: str, shape: tuple[int, ...], pool: torch.Tensor, offset: int) -> torch.Tensor:
    """Random-looking bf16 values (norm weights are ones, as a fresh model has them)."""
    numel = _numel(shape)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    start = offset % POOL_ELEMENTS
    rolled = torch.cat([pool[start:], pool[:start]])
    repeats = -(-numel // POOL_ELEMENTS)
    flat = rolled.repeat(repeats)[:numel] if repeats > 1 else rolled[:numel]
    return flat.clone().reshape(shape)
