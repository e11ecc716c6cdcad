"""Attaching PEFT adapters to a resident model: several named adapters, one active.

The adapter's own config is checked first (its files, its target modules),
so a mismatch fails with a message that says what to change instead of a shape error.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open

from schemas.errors import AdapterIncompatible, InvalidJob, UnsafeWeights
from worker.errors import translate
from worker.models.resolve import ADAPTER_CONFIG, Source, read_json

log = logging.getLogger(__name__)


def attach(model: torch.nn.Module, adapter: Source, name: str, *,
           activate: bool = True) -> torch.nn.Module:
    """Attach `adapter` as `name`; returns the (possibly newly wrapped) PeftModel."""
    config_path = adapter.path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterIncompatible(f"{adapter.ref} has no adapter_config.json: is it a PEFT "
                                  "adapter folder?", ref=adapter.ref)
    if not any(p.suffix == ".safetensors" for p in adapter.path.iterdir()):
        raise UnsafeWeights(f"adapter {adapter.ref} has no adapter_model.safetensors: save it "
                            "with safetensors", ref=adapter.ref)
    config = read_json(config_path)
    _check_targets(model, adapter.ref, config)
    _check_shapes(model, adapter.path, adapter.ref)
    if isinstance(model, PeftModel) and name in model.peft_config:
        raise InvalidJob(f"adapter name {name!r} is already attached to this model: pick another "
                         "name", name=name)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter.path), adapter_name=name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, str(adapter.path), adapter_name=name,
                                              is_trainable=False)
    except Exception as exc:
        raise translate(exc, ref=adapter.ref) from exc
    # peft leaves the model in eval mode (is_trainable=False), and a freshly wrapped
    # model already has its one adapter active: switching costs a walk over every module
    if activate and model.active_adapter != name:
        model.set_adapter(name, inference_mode=True)
    return model


def activate(model: torch.nn.Module, name: str) -> None:
    """Make `name` the active adapter, frozen (peft's default would make it trainable)."""
    if not isinstance(model, PeftModel) or name not in model.peft_config:
        raise InvalidJob(f"no adapter named {name!r} on this model", name=name)
    model.set_adapter(name, inference_mode=True)


def names(model: torch.nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(attached adapter names, active adapter names)."""
    if not isinstance(model, PeftModel):
        return (), ()
    return tuple(model.peft_config), tuple(model.active_adapters)


def _check_targets(model: torch.nn.Module, ref: str, config: dict[str, Any]) -> None:
    targets = config.get("target_modules")
    if not targets or isinstance(targets, str):  # a regex or 'all-linear': peft checks it
        return
    module_names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = sorted(set(targets) - module_names)
    if missing == sorted(set(targets)):
        raise AdapterIncompatible(
            f"adapter {ref} targets modules {missing} that this model does not have: it was "
            "trained on another architecture", ref=ref, missing=missing)


_LORA_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])(\.[^.]+)?\.weight$")
"""A LoRA weight in a saved adapter: lora_A is [r, in_features], lora_B [out_features, r]."""


def _check_shapes(model: torch.nn.Module, folder: Path, ref: str) -> None:
    """AdapterIncompatible naming the first LoRA tensor whose shape does not fit its layer,
    read from the safetensors header before peft changes the model (a failed attach would
    otherwise leave half-injected layers on a resident model)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    modules = dict(base.named_modules())
    with safe_open(str(files[0]), framework="pt") as weights:
        for key in sorted(weights.keys()):
            found = _LORA_TENSOR.match(key)
            module = modules.get(found["module"]) if found else None
            if found is None or module is None:
                continue
            shape = list(weights.get_slice(key).get_shape())
            want = _lora_shape(module, found["half"], shape)
            if want is not None and want != shape:
                raise AdapterIncompatible(
                    f"adapter {ref} does not fit this model: tensor {key} is {shape} in the "
                    f"adapter but {want} in the model, so it was trained on a base of another "
                    "size: attach it to the model it was built for", ref=ref, tensor=key,
                    adapter_shape=shape, model_shape=want)


def _lora_shape(module: torch.nn.Module, half: str, shape: list[int]) -> list[int] | None:
    """The shape `module` needs for its lora_A or lora_B weight of rank shape's; None if unknown."""
    fan_in, fan_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if len(shape) != 2 or not isinstance(fan_in, int) or not isinstance(fan_out, int):
        return None
    return [shape[0], fan_in] if half == "A" else [fan_out, shape[1]]
