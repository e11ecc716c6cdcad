"""How a model is loaded: dtype, bitsandbytes quantization and placement (no torch here)."""

from __future__ import annotations

import re
from enum import Enum
from typing import Any

from pydantic import Field, field_validator, model_validator

from schemas.base import Contract


class DType(str, Enum):
    """Floating-point type of the unquantized weights."""

    auto = "auto"  # whatever config.json says (float32 when it says nothing)
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class QuantMethod(str, Enum):
    """bitsandbytes quantization of the linear layers."""

    none = "none"  # full precision in the job's dtype
    int8 = "int8"  # LLM.int8(), 8-bit weights with outlier decomposition
    nf4 = "nf4"  # 4-bit NormalFloat (QLoRA)
    fp4 = "fp4"  # 4-bit float


FOUR_BIT = frozenset({QuantMethod.nf4, QuantMethod.fp4})


class QuantizationSpec(Contract):
    """A bitsandbytes configuration; options that don't apply to `method` are errors.

    Unset options take bitsandbytes' defaults: `double_quant` false,
    `compute_dtype` bfloat16 for 4-bit, `int8_threshold` 6.0 for int8.
    """

    method: QuantMethod = QuantMethod.none
    double_quant: bool | None = None
    compute_dtype: DType | None = None
    int8_threshold: float | None = Field(default=None, gt=0)
    skip_modules: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"method": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> QuantizationSpec:
        four_bit = self.method in FOUR_BIT
        if self.method is QuantMethod.none:
            if self.double_quant is not None or self.compute_dtype is not None or \
                    self.int8_threshold is not None or self.skip_modules:
                raise ValueError("quantization options need a method: int8, nf4 or fp4")
        if not four_bit and self.double_quant is not None:
            raise ValueError("'double_quant' applies to 4-bit (nf4, fp4) only")
        if not four_bit and self.compute_dtype is not None:
            raise ValueError("'compute_dtype' applies to 4-bit (nf4, fp4) only")
        if self.compute_dtype is DType.auto:
            raise ValueError("'compute_dtype' must be float32, bfloat16 or float16")
        if self.method is not QuantMethod.int8 and self.int8_threshold is not None:
            raise ValueError("'int8_threshold' applies to int8 only")
        for module in self.skip_modules:
            if not re.fullmatch(r"[\w.]+", module):
                raise ValueError(f"skip module {module!r} must be a module name such as 'lm_head'")
        return self

    @property
    def quantized(self) -> bool:
        return self.method is not QuantMethod.none


_DEVICE = re.compile(r"cpu|cuda|cuda:\d+|mps|disk|\d+")
DEVICE_MAP_STRATEGIES = frozenset({"auto", "balanced", "balanced_low_0", "sequential"})
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", flags=re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """'20GiB', '500MB', '1024' or an int, as a byte count."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"size {value!r} must be a number of bytes or like '20GiB', '500MB'")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def check_device(device: str) -> str:
    if not _DEVICE.fullmatch(device):
        raise ValueError(f"device {device!r} must be 'cpu', 'cuda', 'cuda:N', 'disk' or N")
    return device


DeviceMap = str | dict[str, str | int]


class PlacementSpec(Contract):
    """accelerate placement: a `device_map` strategy, one device, or a module map.

    `device_map` None places the whole model on the worker's device.
    `max_memory` maps devices ('0', 'cuda:0', 'cpu') to byte budgets.
    """

    device_map: DeviceMap | None = None
    max_memory: dict[str, int] | None = None

    @field_validator("device_map")
    @classmethod
    def _check_map(cls, value: DeviceMap | None) -> DeviceMap | None:
        if value is None:
            return None
        if isinstance(value, str):
            return value if value in DEVICE_MAP_STRATEGIES else check_device(value)
        if not value:
            raise ValueError("an explicit device_map needs at least one module")
        for module, device in value.items():
            if module and not re.fullmatch(r"[\w.]+", module):
                raise ValueError(f"device_map key {module!r} must be a module name ('' for all)")
            check_device(str(device))
        return value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _parse_memory(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict) or not value:
            raise ValueError("max_memory maps devices to sizes, e.g. {'0': '20GiB', 'cpu': '30GiB'}")
        return {check_device(str(dev)): parse_bytes(size) for dev, size in value.items()}
