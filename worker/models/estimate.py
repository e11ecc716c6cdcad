"""Predicting a model's resident bytes before loading it: no weights are read.

The structure comes from `config.json` (the model is built on the meta device,
which allocates nothing) and the stored tensors from each safetensors file's
header (the 8-byte length and the JSON that follows). The prediction follows
what transformers' bitsandbytes integration does: only `nn.Linear` modules are
quantized; the output embedding, tied weights, the last parameter and
`_keep_in_fp32_modules` stay unquantized unless the job names its own skip list
(then only that list and `_keep_in_fp32_modules` are skipped). The bytes for one
(config, dtype, quantization) are kept per process, so the meta model is built once.

This module must not load weights or touch a device.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

import torch

from schemas import LoadJob, QuantizationSpec, QuantMethod
from schemas.specs import FOUR_BIT, DType

log = logging.getLogger(__name__)

BLOCKSIZE_4BIT = 64  # bitsandbytes' default for 4-bit weights
BLOCKSIZE_NESTED = 256  # double quantization: absmax values per second-level block
CODE_4BIT_BYTES = 16 * 4  # the nf4/fp4 code book, float32, one per layer
CODE_NESTED_BYTES = 256 * 4  # the 8-bit code book of double quantization, one per layer
OFFSET_BYTES = 4  # double quantization: the mean subtracted from absmax

_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                       "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header: tensor name -> {dtype, shape, data_offsets} (and __metadata__)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * 2**20:
            raise ValueError(f"{path} has an implausible safetensors header ({length} bytes)")
        header: dict[str, Any] = json.loads(handle.read(length))
    return header


def stored_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor in the folder's safetensors files: name -> (dtype, shape)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, meta in read_header(file).items():
            if name != "__metadata__":
                out[name] = (str(meta["dtype"]), tuple(int(d) for d in meta["shape"]))
    return out


def checkpoint_dtype(config: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...]]]) -> torch.dtype:
    """What `dtype="auto"` gives: config.json's dtype, else the first floating tensor's, else fp32."""
    named = _named_dtype(config)
    if named is not None:
        return named
    for dtype, _shape in tensors.values():
        if dtype in ("F32", "BF16", "F16"):
            return _TORCH_DTYPES[dtype]
    return torch.float32


def estimate_model(folder: Path, config: dict[str, Any], job: LoadJob) -> int:
    """Predicted bytes of parameters, buffers and quantization state once `job` has loaded."""
    if job.dtype is DType.auto:
        dtype = checkpoint_dtype(config, {} if _named_dtype(config) else stored_tensors(folder))
    else:
        dtype = _TORCH_DTYPES[job.dtype.value]
    return _model_bytes(json.dumps(config, sort_keys=True), dtype, job.quantization)


@functools.lru_cache(maxsize=64)
def _model_bytes(config_json: str, dtype: torch.dtype, spec: QuantizationSpec) -> int:
    """The bytes of the model `config_json` describes: a pure function, so cached per process.

    A reload, or another folder with the same config.json (a fine-tune, a new revision
    of the same architecture), skips the meta-device build; a changed config is a new key.
    """
    config = json.loads(config_json)
    model = _meta_model(config)
    element = torch.empty((), dtype=dtype).element_size()
    method = spec.method
    skip = _not_converted(model, spec) if method is not QuantMethod.none else []
    keep_fp32 = [] if dtype == torch.float32 else list(getattr(model, "_keep_in_fp32_modules", None) or [])
    seen: set[int] = set()
    total = 0
    for module_name, module in model.named_modules():
        quantize = (method is not QuantMethod.none and type(module) is torch.nn.Linear
                    and _should_convert(module_name, skip))
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}" if module_name else param_name
            if quantize and param_name == "weight":
                total += quantized_bytes(method, param.numel(), param.shape[0], bool(spec.double_quant))
            elif keep_fp32 and not _should_convert(full, keep_fp32):
                total += param.numel() * 4
            else:
                total += param.numel() * (element if param.is_floating_point() else param.element_size())
        for _name, buffer in module.named_buffers(recurse=False):
            if id(buffer) not in seen:
                seen.add(id(buffer))
                total += buffer.numel() * buffer.element_size()
    return total


def _named_dtype(config: dict[str, Any]) -> torch.dtype | None:
    named = config.get("dtype") or config.get("torch_dtype")
    return _TORCH_DTYPES[named] if isinstance(named, str) and named in _TORCH_DTYPES else None


def quantized_bytes(method: QuantMethod, numel: int, out_features: int, double_quant: bool) -> int:
    """Bytes of one quantized linear weight with its bitsandbytes state."""
    if method is QuantMethod.int8:
        return numel + out_features * 4  # int8 weight + one float32 scale (SCB) per row
    assert method in FOUR_BIT
    blocks = math.ceil(numel / BLOCKSIZE_4BIT)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + blocks * 4 + CODE_4BIT_BYTES
    nested = math.ceil(blocks / BLOCKSIZE_NESTED)
    return packed + blocks + OFFSET_BYTES + nested * 4 + CODE_NESTED_BYTES + CODE_4BIT_BYTES


def estimate_adapter(folder: Path) -> int:
    """Predicted bytes of a PEFT adapter once attached.

    peft casts float16/bfloat16 adapter weights to float32 (`autocast_adapter_dtype`),
    so every floating tensor counts four bytes per element.
    """
    total = 0
    for dtype, shape in stored_tensors(folder).values():
        numel = math.prod(shape)
        total += numel * (4 if dtype in ("F32", "BF16", "F16") else _SAFETENSORS_DTYPES.get(dtype, 4))
    return total


def weights_bytes(folder: Path) -> int:
    """The size of a folder's safetensors files: roughly what an unquantized load takes."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def estimate(folder: Path, config: dict[str, Any], job: LoadJob,
             adapter_folders: list[Path] | tuple[Path, ...] = ()) -> int:
    """The model's bytes plus each adapter's."""
    return estimate_model(folder, config, job) + sum(estimate_adapter(a) for a in adapter_folders)


# --- structure from config.json, on the meta device -------------------------------------

def _meta_model(config: dict[str, Any]) -> torch.nn.Module:
    """The model's modules on the meta device, tied as from_pretrained ties them.

    Random initialisation is skipped (on meta it computes nothing, and it is about
    half the build); `init_weights` on the meta device then only ties the weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("transformers_version",)})
    with torch.device("meta"):
        with no_init_weights():
            model: Any = AutoModelForCausalLM.from_config(cfg)
        model.init_weights()
    built: torch.nn.Module = model
    return built


def _not_converted(model: torch.nn.Module, spec: QuantizationSpec) -> list[str]:
    """The module names transformers' bnb quantizer leaves alone, as it computes them."""
    from transformers.quantizers.base import HfQuantizer

    skip = list(spec.skip_modules) or None
    keep = getattr(model, "_keep_in_fp32_modules", None)
    return list(HfQuantizer.get_modules_to_not_convert(model, skip, keep))  # type: ignore[arg-type]


def _should_convert(name: str, patterns: list[str]) -> bool:
    from transformers.quantizers.quantizers_utils import should_convert_module

    return bool(should_convert_module(name, patterns))
