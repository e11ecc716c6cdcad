"""Adapters as a task sees them: which are active for one call, and which parameters are one's own.

`call_task` sets the job's active adapters and puts the model's own back with
`adapter_state` / `set_active` / `restore`; training selects one adapter's
parameters with `adapter_parameters`, found structurally through peft's tuner
layers (never by matching names, which a module could share with an adapter).
Resident adapters stay frozen: activation never makes a parameter trainable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper

from schemas.errors import InvalidJob


@dataclass(frozen=True)
class AdapterState:
    """The adapters a PeftModel has active, and whether its adapter layers are on at all."""

    active: tuple[str, ...]
    enabled: bool  # False: the adapter layers are off, the model runs as its base


def adapter_state(model: torch.nn.Module) -> AdapterState | None:
    """The model's adapter state; None for a model without adapters."""
    if not isinstance(model, PeftModel):
        return None
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    enabled = not layers or not all(layer.disable_adapters for layer in layers)
    return AdapterState(tuple(model.active_adapters), enabled)


def set_active(model: torch.nn.Module, names: Sequence[str]) -> tuple[str, ...]:
    """Make exactly `names` active (``()``: the base alone); the names active afterwards.

    InvalidJob when the model lacks one of them.
    """
    names = tuple(names)
    if not isinstance(model, PeftModel):
        if names:
            raise InvalidJob(f"adapters {list(names)} asked for, but the model has no adapters: "
                             "attach them first, or leave 'adapters' out", adapters=list(names))
        return ()
    missing = [name for name in names if name not in model.peft_config]
    if missing:
        raise InvalidJob(f"the model has no adapter named {', '.join(map(repr, missing))} (it has "
                         f"{', '.join(map(repr, model.peft_config))})", adapters=missing)
    tuner: Any = model.base_model  # a peft BaseTuner (LoraModel)
    if not names:
        tuner.disable_adapter_layers()
        return ()
    state = adapter_state(model)
    if state is not None and not state.enabled:
        tuner.enable_adapter_layers()  # which makes the active adapters trainable: set_adapter freezes them
    model.set_adapter(names[0], inference_mode=True)  # also PeftModel's own active_adapter
    if len(names) > 1:
        tuner.set_adapter(list(names), inference_mode=True)
    return names


def restore(model: torch.nn.Module, state: AdapterState | None) -> None:
    """Put back an `adapter_state` taken before (no-op for None or a model without adapters)."""
    if state is None or not isinstance(model, PeftModel):
        return
    present = tuple(name for name in state.active if name in model.peft_config)
    if present:
        set_active(model, present)
    if not state.enabled:
        tuner: Any = model.base_model
        tuner.disable_adapter_layers()


def adapter_parameters(model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The parameters that belong to adapter `name` alone (LoRA A/B, embeddings, saved modules)."""
    found: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attribute in module.adapter_layer_names:
                holder = getattr(module, attribute, None)
                if isinstance(holder, (torch.nn.ModuleDict, torch.nn.ParameterDict)) and name in holder:
                    item = holder[name]
                    params = [item] if isinstance(item, torch.nn.Parameter) else list(item.parameters())
                    found.update((id(p), p) for p in params)
        elif isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            found.update((id(p), p) for p in module.modules_to_save[name].parameters())
    return list(found.values())
