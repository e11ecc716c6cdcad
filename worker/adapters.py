"""Attaching PEFT adapters to a resident model: several named adapters, one active.

The adapter's own config is checked first (its files, its target modules),
so a mismatch fails with a message that says what to change instead of a shape error.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from peft import PeftModel

from schemas.errors import AdapterIncompatible, InvalidJob, UnsafeWeights
from worker.errors import translate
from worker.resolve import ADAPTER_CONFIG, Source, read_json

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
