"""Loading a resolved model with from_pretrained: dtype, bitsandbytes, device_map, max_memory.

Also what a loaded model is reported as: its key, size, parameter count and a
summary of where its layers went.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from schemas import InvalidJob, LoadJob, PlacementSpec, QuantizationSpec, QuantMethod
from schemas.specs import DEVICE_MAP_STRATEGIES, DType
from worker.access import OPEN, Access
from worker.jobs.progress import Reporter, transformers_bars
from worker.models.resolve import Resolved

TORCH_DTYPES = {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16,
                DType.float16: torch.float16}


def model_key(identity: str, job: LoadJob, device: str) -> str:
    """A stable key for (resolved base, dtype, quantization, placement on `device`).

    The placement is the resolved one (`resolved_placement`), not the spec as written:
    placements that put the model in the same place share one resident copy."""
    spec = {"base": identity, "dtype": job.dtype.value,
            "quantization": job.quantization.model_dump(mode="json"),
            "placement": resolved_placement(job.placement, device)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def resolved_placement(placement: PlacementSpec, device: str) -> dict[str, Any]:
    """Where `placement` puts a model on a worker pinned to `device`, as far as is known
    before loading (InvalidJob for devices the worker has not).

    One device or a module map is placed as given, and transformers reads `max_memory`
    for a strategy only: so every such placement resolves to its map, with every module on
    one device written `{"": device}` (no device_map at all, `"cpu"` on a cpu worker,
    `{"": "cuda"}` on a GPU worker, whatever their max_memory). A strategy ("auto", ...)
    reaches here already resolved to its map (worker/models/placement.py); one that could not be
    resolved before loading is kept as asked, budgets included.
    """
    args = placement_args(placement, device)
    device_map = args["device_map"]
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
        return {"device_map": {"": device_map}}
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        return {"device_map": {"": devices.pop()} if len(devices) == 1 else device_map}
    budgets = {str(dev): size for dev, size in (args.get("max_memory") or {}).items()}
    return {"device_map": device_map, "max_memory": budgets or None}


def bnb_config(spec: QuantizationSpec, dtype: DType) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig for `spec` (None when not quantized)."""
    skip = list(spec.skip_modules) or None
    if spec.method is QuantMethod.int8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip,
                                  llm_int8_threshold=spec.int8_threshold or 6.0)
    if spec.method in (QuantMethod.nf4, QuantMethod.fp4):
        compute = spec.compute_dtype or (dtype if dtype is not DType.auto else DType.bfloat16)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.method.value,
                                  bnb_4bit_use_double_quant=bool(spec.double_quant),
                                  bnb_4bit_compute_dtype=TORCH_DTYPES[compute],
                                  llm_int8_skip_modules=skip)
    return None


def placement_args(placement: PlacementSpec, device: str) -> dict[str, Any]:
    """device_map / max_memory for a worker pinned to `device` ('cpu' or 'cuda:0')."""
    device_map: Any = placement.device_map if placement.device_map is not None else device
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
        device_map = _local_device(device_map, device)
    elif isinstance(device_map, dict):
        device_map = {module: _local_device(str(dev), device) for module, dev in device_map.items()}
    args: dict[str, Any] = {"device_map": device_map}
    if placement.max_memory:
        args["max_memory"] = {(_gpu_index(dev, device)): size
                              for dev, size in placement.max_memory.items()}
    return args


def _local_device(name: str, device: str) -> str:
    if name in ("cpu", "disk"):
        return name
    if device == "cpu":
        raise InvalidJob(f"this worker runs on the CPU and cannot place layers on {name!r}: "
                         "use 'cpu' or 'auto', or send the job to a GPU worker")
    if name not in ("cuda", "cuda:0", "0"):
        raise InvalidJob(f"a worker holds one GPU, seen as cuda:0; {name!r} is not on it: use "
                         "'cuda', 'cuda:0' or 'cpu' (start one worker per GPU)")
    return device


def _gpu_index(name: str, device: str) -> str | int:
    return name if name in ("cpu", "disk") else int(_local_device(name, device).split(":")[1])


def load(resolved: Resolved, job: LoadJob, device: str, reporter: Reporter,
         access: Access = OPEN, artifact: Path | None = None) -> PreTrainedModel:
    """from_pretrained with the job's settings; weight loading reported as it goes.

    `artifact` is a folder of already-quantized weights (worker/models/artifacts.py): its
    config.json carries the quantization, so none is applied again.
    """
    kwargs: dict[str, Any] = {
        "dtype": "auto" if job.dtype is DType.auto else TORCH_DTYPES[job.dtype],
        "use_safetensors": None if access.allow_pickle else True,  # None: safetensors first
        "trust_remote_code": job.trust_remote_code,
        "token": access.token,
        **placement_args(job.placement, device),
    }
    if job.quantization.quantized and artifact is None:
        kwargs["quantization_config"] = bnb_config(job.quantization, job.dtype)
    if resolved.base.revision is not None and artifact is None:
        kwargs["revision"] = resolved.base.revision
    with transformers_bars(reporter):
        model = AutoModelForCausalLM.from_pretrained(str(artifact or resolved.base.path), **kwargs)
    return model  # in eval mode: from_pretrained sets it (documented), a second walk is not needed


@dataclass(frozen=True)
class Measured:
    """What a loaded model is reported as, taken in one walk over its modules."""

    parameters: int  # as the checkpoint counts them (packed 4-bit weights unpacked)
    footprint: int  # bytes of parameters, buffers and bitsandbytes state (not activations)
    quantized_modules: int  # bitsandbytes Linear layers (8-bit or 4-bit)


def measure(model: torch.nn.Module) -> Measured:
    """Parameters, bytes and quantized layers of `model`; one pass, however large the model."""
    import bitsandbytes as bnb

    quantized_types = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    params: set[int] = set()
    pointers: set[int] = set()  # storage counted once (tied weights), parameters before buffers
    buffers: list[torch.Tensor] = []
    parameters = footprint = quantized = 0
    for module in model.modules():
        quantized += isinstance(module, quantized_types)
        buffers.extend(b for b in module._buffers.values() if b is not None)
        for param in module._parameters.values():
            if param is None or id(param) in params:
                continue
            params.add(id(param))
            state = getattr(param, "quant_state", None)
            parameters += int(torch.Size(state.shape).numel()) if state is not None else param.numel()
            footprint += _tensor_bytes(param, pointers)
    footprint += sum(_tensor_bytes(buffer, pointers) for buffer in buffers)
    return Measured(parameters, footprint, quantized)


def footprint(model: torch.nn.Module) -> int:
    """Bytes the model's parameters, buffers and bitsandbytes state take (not activations)."""
    return measure(model).footprint


def _tensor_bytes(tensor: torch.Tensor, seen: set[int]) -> int:
    """Bytes of `tensor` and its bitsandbytes state; 0 for storage already in `seen`."""
    if tensor.data_ptr() in seen:
        return 0
    seen.add(tensor.data_ptr())
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        total += _quant_state_bytes(state)
    scales = getattr(tensor, "SCB", None)  # int8: one float32 scale per output row
    if isinstance(scales, torch.Tensor) and scales.data_ptr() not in seen:
        seen.add(scales.data_ptr())
        total += scales.numel() * scales.element_size()
    return total


def _quant_state_bytes(state: Any) -> int:
    size = 0
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            size += value.numel() * value.element_size()
        elif hasattr(value, "absmax"):  # nested state of double quantization
            size += _quant_state_bytes(value)
    return size


def device_summary(model: torch.nn.Module, device: str) -> dict[str, str]:
    """Module prefix -> device, with runs of numbered layers collapsed ('model.layers.0-31')."""
    mapping = getattr(model, "hf_device_map", None)
    if not mapping:
        first = next(model.parameters(), None)
        return {"": str(first.device) if first is not None else device}
    mapping = {k: _device_name(v) for k, v in mapping.items()}
    if len(set(mapping.values())) == 1:
        return {"": next(iter(mapping.values()))}
    out: dict[str, str] = {}
    run: tuple[str, int, int, str] | None = None
    for module, dev in mapping.items():
        match = re.fullmatch(r"(.*)\.(\d+)", module)
        if match and run and run[0] == match.group(1) and run[3] == dev and run[2] + 1 == int(match.group(2)):
            run = (run[0], run[1], int(match.group(2)), dev)
            continue
        if run:
            out[_run_name(run)] = run[3]
            run = None
        if match:
            run = (match.group(1), int(match.group(2)), int(match.group(2)), dev)
        else:
            out[module] = dev
    if run:
        out[_run_name(run)] = run[3]
    return out


def _run_name(run: tuple[str, int, int, str]) -> str:
    prefix, first, last, _ = run
    return f"{prefix}.{first}" if first == last else f"{prefix}.{first}-{last}"


def _device_name(value: Any) -> str:
    return f"cuda:{value}" if isinstance(value, int) else str(value)
