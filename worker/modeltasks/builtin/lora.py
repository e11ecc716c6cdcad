"""Built-in adapter tasks: `modelq.add_adapter` (a new trainable LoRA) and `modelq.save_adapter`.

Adding the first adapter to a plain model wraps it in a PeftModel: the task puts
the wrapper in ``ctx.model`` and `call_task` reports the model as replaced (peft
injects the LoRA layers into the base's modules in place, so the old object must
not be used on its own afterwards). Training is in worker/modeltasks/builtin/train.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from schemas.errors import InvalidJob
from schemas.jobs import check_adapter_name
from worker.modeltasks.activation import adapter_parameters, set_active
from worker.modeltasks.registry import TaskContext, model_task

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@model_task("modelq.add_adapter", changes_adapters=True)
def add_adapter(ctx: TaskContext, name: str, config: dict[str, Any],
                activate: bool = False) -> dict[str, Any]:
    """Add a new, untrained LoRA adapter `name` built from a LoraConfig given as JSON.

    On a plain model it is the model's first adapter, hence active; on a PeftModel the
    active adapters stay as they were unless `activate`. Its parameters stay frozen
    until `modelq.train_adapter` trains them.
    """
    plain, name = check_name(name), ctx.adapter_name(name)  # the name on the model (tenants)
    params = create_adapter(ctx, name, lora_config(config))
    if activate:
        ctx.adapters = set_active(ctx.model, (name,))
    return {"adapter": plain, "trainable_parameters": sum(p.numel() for p in params)}


def create_adapter(ctx: TaskContext, name: str, lora: LoraConfig) -> list[torch.nn.Parameter]:
    """Add LoRA adapter `name` (as named on the model) to `ctx.model`, frozen; its parameters.

    A plain model is wrapped in a PeftModel, put in ``ctx.model``. The new LoRA weights
    come from torch's global RNG: seed it around the call for a reproducible adapter.
    """
    model = ctx.model
    was_training = model.training
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise InvalidJob(f"the model has an adapter named {name!r} already: pick another name", name=name)
        try:
            model.add_adapter(name, lora)
        except ValueError as exc:
            raise InvalidJob(f"adapter {name!r} cannot be added to this model: {exc}", name=name) from None
    else:
        try:
            model = get_peft_model(model, lora, adapter_name=name)
        except ValueError as exc:
            raise InvalidJob(f"adapter {name!r} does not fit this model: {exc}", name=name) from None
        ctx.model = model
    params = adapter_parameters(model, name)
    for parameter in params:
        parameter.requires_grad_(False)
    model.train(was_training)  # new LoRA modules start in train mode (dropout on): match the model
    return params


def check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidJob(f"an adapter name must be a string, not {type(name).__name__}")
    try:
        return check_adapter_name(name)
    except ValueError as exc:
        raise InvalidJob(str(exc), name=name) from None


def lora_config(config: Any) -> LoraConfig:
    """A LoraConfig from JSON with peft's field names; InvalidJob names unknown or bad fields."""
    if not isinstance(config, dict):
        raise InvalidJob("config must be a JSON object of LoraConfig fields, e.g. "
                         '{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}')
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InvalidJob(f"config has fields LoraConfig does not know: {', '.join(unknown)} (see "
                         "peft's LoraConfig for the field names)", unknown=unknown)
    fields = {"task_type": "CAUSAL_LM", **config}
    if fields["task_type"] != "CAUSAL_LM":
        raise InvalidJob("task_type must be CAUSAL_LM (modelq serves causal language models)")
    try:
        return LoraConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"config is not a valid LoraConfig: {exc}") from None


@model_task("modelq.save_adapter")
def save_adapter(ctx: TaskContext, adapter: str, output_dir: str) -> dict[str, Any]:
    """Write adapter `adapter` to `output_dir` (adapter_config.json, adapter_model.safetensors)."""
    require_adapter(ctx.model, ctx.adapter_name(adapter))
    folder = ctx.resolve_path(output_dir, for_writing=True)
    write_adapter(ctx.model, ctx.adapter_name(adapter), folder, base_model=ctx.base_model)
    return {"adapter": adapter, "output_dir": str(folder)}


def require_adapter(model: torch.nn.Module, adapter: str) -> PeftModel:
    """`model` as a PeftModel that holds `adapter`; InvalidJob otherwise."""
    if not isinstance(model, PeftModel) or adapter not in model.peft_config:
        have = list(model.peft_config) if isinstance(model, PeftModel) else []
        raise InvalidJob(f"the model has no adapter named {adapter!r} (it has {have or 'none'}): add it "
                         "with modelq.add_adapter or attach it first", adapter=adapter)
    return model


def write_adapter(model: torch.nn.Module, adapter: str, folder: Path, *,
                  base_model: str | None = None) -> None:
    """Save one adapter in peft's layout, its files directly in `folder` (whatever its name).

    peft puts an adapter not named 'default' in a subfolder of that name; the files
    are saved in a scratch folder beside them and moved up, each replaced atomically.
    `base_model`: the base as its user names it (a repo id or the folder the job named),
    written as `base_model_name_or_path` instead of the folder the weights were read
    from (a quantized artifact, a hub snapshot), so the adapter attaches to that base.
    """
    model = require_adapter(model, adapter)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".saving-") as scratch:
        # "auto" would look the base up on the hub to compare vocab sizes (a network call)
        # handed the tensors as held, peft never calls the model's state_dict(): bitsandbytes'
        # _save_to_state_dict would unpack a CPU-repacked 4-bit base in place (training/kbit.py)
        held = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        model.save_pretrained(scratch, selected_adapters=[adapter], save_embedding_layers=False,
                              state_dict=held)
        source = Path(scratch) if adapter == "default" else Path(scratch) / adapter
        if base_model is not None:
            config_file = source / "adapter_config.json"
            config = json.loads(config_file.read_text())
            config["base_model_name_or_path"] = base_model
            config_file.write_text(json.dumps(config, indent=2))
        for name in ADAPTER_FILES:
            os.replace(source / name, folder / name)
