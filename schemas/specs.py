"""How a model is loaded: dtype, bitsandbytes quantization and placement (no torch here).

Every rule here is also stated in the JSON Schema (schemas/job_schema.py), with the
same patterns and limits (schemas/text.py).
"""

from __future__ import annotations

import re
from decimal import Decimal
from enum import Enum
from typing import Annotated, Any

from pydantic import Field, StrictBool, WithJsonSchema, field_validator, model_validator

from schemas.base import Contract
from schemas.text import (
    MAX_BYTES,
    MAX_DEVICE_INDEX,
    MAX_DEVICE_MAP_ENTRIES,
    MAX_INT8_THRESHOLD,
    MAX_MEMORY_ENTRIES,
    MAX_MODULE,
    MAX_SIZE_TEXT,
    MAX_SKIP_MODULES,
    check_pattern,
    short,
)


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
MODULE = r"[A-Za-z0-9_.]+"
"""A module path such as 'lm_head' or 'model.layers.0' (device_map keys may also be '')."""


def check_module(module: str, what: str = "skip module") -> str:
    return check_pattern(module, what, MAX_MODULE, MODULE, "must be a module name such as 'lm_head'")


class QuantizationSpec(Contract):
    """A bitsandbytes configuration; options that don't apply to `method` are errors.

    Unset options take bitsandbytes' defaults: `double_quant` false,
    `compute_dtype` bfloat16 for 4-bit, `int8_threshold` 6.0 for int8.
    """

    method: QuantMethod = QuantMethod.none
    double_quant: StrictBool | None = None
    compute_dtype: DType | None = None
    int8_threshold: Annotated[float, Field(strict=True, gt=0, le=MAX_INT8_THRESHOLD,
                                           allow_inf_nan=False)] | None = None
    skip_modules: tuple[str, ...] = Field(default=(), max_length=MAX_SKIP_MODULES)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"method": value} if isinstance(value, str) else value

    @field_validator("skip_modules")
    @classmethod
    def _modules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for module in value:
            check_module(module)
        return value

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
        return self

    @property
    def quantized(self) -> bool:
        return self.method is not QuantMethod.none


DEVICE = r"cpu|cuda|cuda:[0-9]{1,4}|mps|disk|[0-9]{1,4}"
DEVICE_MAP_STRATEGIES = frozenset({"auto", "balanced", "balanced_low_0", "sequential"})
SIZE = r"[0-9]+(?:\.[0-9]+)? ?(?:[KkMmGgTt][Ii]?[Bb]|[Bb])?"
"""A byte size: '30GiB', '500 MB', '1.5kib', '1024'; units are case-insensitive."""
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?([KMGT]i?B|B)?", flags=re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _whole(value: Any, what: str, maximum: int) -> int | None:
    """`value` as an int when it is a whole JSON number within 0..maximum (1.0 is whole), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{what} {short(value)} must be a whole number")
    if not 0 <= value <= maximum:
        raise ValueError(f"{what} {short(value)} must be between 0 and {maximum}")
    return int(value)


def check_size(value: Any) -> int:
    """A byte budget: a whole number of bytes, or a size like '30GiB', '500MB' (no padding).

    A size string is worked out exactly (not through a float) and one above MAX_BYTES (8 EiB,
    more than any machine: no limit) counts as MAX_BYTES, so that the job a record shows is
    one the schema accepts (a string's value is beyond what JSON Schema can bound)."""
    number = _whole(value, "size", MAX_BYTES)
    if number is not None:
        return number
    if not isinstance(value, str):
        raise ValueError(f"size {short(value)} must be a number of bytes or like '20GiB', '500MB'")
    check_pattern(value, "size", MAX_SIZE_TEXT, SIZE, "must be a number of bytes or like '20GiB', '500MB'")
    match = _SIZE.fullmatch(value)
    assert match is not None  # SIZE and _SIZE say the same
    return min(int(Decimal(match.group(1)) * _UNITS[(match.group(2) or "").lower()]), MAX_BYTES)


def parse_bytes(value: int | str) -> int:
    """'20GiB', '500MB', '1024' or an int, as a byte count (surrounding spaces ignored)."""
    return check_size(value.strip() if isinstance(value, str) else value)


def check_device(device: Any) -> str | int:
    """A device: 'cpu', 'cuda', 'cuda:N', 'mps', 'disk', 'N', or N (0..9999) as a number."""
    number = _whole(device, "device", MAX_DEVICE_INDEX)
    if number is not None:
        return number
    if not isinstance(device, str):
        raise ValueError(f"device {short(device)} must be 'cpu', 'cuda', 'cuda:N', 'disk' or N")
    return check_pattern(device, "device", MAX_SIZE_TEXT, DEVICE,
                         "must be 'cpu', 'cuda', 'cuda:N', 'disk' or N (N at most 4 digits)")


DeviceMap = str | dict[str, str | int]

SIZE_JSON_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_BYTES},
                              {"type": "string", "maxLength": MAX_SIZE_TEXT, "pattern": f"^(?:{SIZE})$"}],
                    "description": "Bytes, or a size such as '30GiB', '500MB' (units case-insensitive)."}
"""What a size is on the way in, in the JSON Schema pydantic makes of these models (the gateway's
OpenAPI, which the gateway holds bodies to): bytes, or accelerate's unit strings ('30GiB')."""
Size = Annotated[int, WithJsonSchema(SIZE_JSON_SCHEMA, mode="validation")]
"""A byte count; taken as a number or a unit string (see `check_size`), always stored as bytes."""


class PlacementSpec(Contract):
    """accelerate placement: a `device_map` strategy, one device, or a module map.

    `device_map` None places the whole model on the worker's device.
    `max_memory` maps devices ('0', 'cuda:0', 'cpu') to byte budgets.
    """

    device_map: DeviceMap | None = None
    max_memory: dict[str, Size] | None = None

    @field_validator("device_map", mode="before")
    @classmethod
    def _check_map(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value in DEVICE_MAP_STRATEGIES):
            return value
        if isinstance(value, str):
            return check_device(value)
        if not isinstance(value, dict) or not value or len(value) > MAX_DEVICE_MAP_ENTRIES:
            raise ValueError("device_map is a strategy, a device, or a map of 1 to "
                             f"{MAX_DEVICE_MAP_ENTRIES} modules to devices")
        for module in value:
            if not isinstance(module, str):
                raise ValueError(f"device_map key {short(module)} must be a module name ('' for all)")
            if module:
                check_module(module, "device_map key")
        return {module: check_device(device) for module, device in value.items()}

    @field_validator("max_memory", mode="before")
    @classmethod
    def _parse_memory(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict) or not value or len(value) > MAX_MEMORY_ENTRIES:
            raise ValueError("max_memory maps 1 to 64 devices to sizes, e.g. {'0': '20GiB', 'cpu': '30GiB'}")
        return {str(check_device(str(dev))): check_size(size) for dev, size in value.items()}
