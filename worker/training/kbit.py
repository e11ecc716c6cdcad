"""The shared base while an adapter trains on it: what training changes, and how it is put back.

Why QLoRA stopped learning once the base had served a generate job: bitsandbytes' CPU
path repacks a 4-bit `Linear4bit` weight in place, on its first forward in eval mode
without grad (any generate or loglikelihood), into a layout for its AVX512-BF16 kernel
(`packing_format_for_cpu`, absmax in bfloat16). From then on every forward of that layer
goes through `gemv_4bit`, an op with no autograd: backward passes no gradient through the
frozen base, so every LoRA layer before the last one learns nothing and the loss stays flat.
`base_for_training` gives each repacked layer, for the run, a plain 4-bit weight with the
same values (its bfloat16 absmax, unnested: exactly what inference used), turns the repacking
off, and on the way out puts the very objects inference had back: the base ends the job
byte for byte as it started, and serves exactly as before.

peft's `prepare_model_for_kbit_training` is never applied: it casts the base's non-quantized
weights to float32 and freezes in place. Gradient checkpointing (on by default for a 4-bit
base) is the non-reentrant kind, which needs no input-require-grads hook; whatever the model
had of either before is what it has after.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from worker.modeltasks.activation import AdapterState, adapter_state, restore, set_active


def quantized_4bit(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's bitsandbytes 4-bit linear layers."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is installed with the worker
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


@contextmanager
def base_for_training(model: torch.nn.Module, *, checkpointing: bool) -> Iterator[None]:
    """The model ready to train an adapter on (4-bit layers unpacked, checkpointing as asked)."""
    with ExitStack() as stack:
        stack.enter_context(unpacked_4bit(model))
        if checkpointing:
            stack.enter_context(_checkpointing(model))
        yield


@contextmanager
def unpacked_4bit(model: torch.nn.Module) -> Iterator[None]:
    """Each repacked 4-bit layer with a plain twin for the block's length, the very objects
    inference had put back after. Around training, and around anything that takes the
    model's `state_dict()`: bitsandbytes' `_save_to_state_dict` unpacks a repacked CPU weight
    in place, quantizing its scales again, and the base would answer differently from then
    on (saving an adapter avoids it another way: builtin/lora.py hands peft the tensors)."""
    with ExitStack() as stack:
        for layer in quantized_4bit(model):
            stack.enter_context(_plain_4bit(layer))
        yield


@contextmanager
def _plain_4bit(layer: Any) -> Iterator[None]:
    weight = layer.weight
    packing = getattr(layer, "support_avx512bf16_for_cpu", False)
    data, state = weight.data, weight.quant_state
    packed = state is not None and getattr(state, "packing_format_for_cpu", False)
    layer.support_avx512bf16_for_cpu = False  # no repacking meanwhile (eval losses run in eval mode)
    try:
        if packed:
            weight.data, weight.quant_state = _unpacked(data, state)
            layer.quant_state = weight.quant_state
        yield
    finally:
        if packed:
            weight.data, weight.quant_state = data, state
            layer.quant_state = state
        layer.support_avx512bf16_for_cpu = packing


def _unpacked(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """A packed CPU weight as bitsandbytes' plain 4-bit layout, the same values, on a copy of
    its quant state (absmax unnested in float32, so nothing is quantized twice)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    twin = copy.copy(state)
    absmax = state.absmax
    twin.original_nested = False  # keep the inference absmax as it is, not blockwise-quantized again
    qweight, twin = _convert_weight_packed_for_cpu_inverse(data.clone(), twin)
    twin.absmax = absmax.T.reshape(-1).to(torch.float32).contiguous()
    twin.nested = False
    twin.dtype = state.original_dtype
    return qweight, twin


@contextmanager
def _checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """Non-reentrant gradient checkpointing for the run; the model's own setting after it."""
    getter: Any = getattr(model, "get_base_model", None)
    inner: Any = getter() if callable(getter) else model
    if not getattr(inner, "supports_gradient_checkpointing", False) or inner.is_activation_checkpointing:
        yield
        return
    had_hook = hasattr(inner, "_require_grads_hook")
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not had_hook and hasattr(inner, "_require_grads_hook"):
        inner.disable_input_require_grads()  # only reentrant checkpointing needs it
    try:
        yield
    finally:
        inner.activation_checkpointing_disable()
        if not had_hook and hasattr(inner, "_require_grads_hook"):
            inner.disable_input_require_grads()


@contextmanager
def training(model: torch.nn.Module, params: list[torch.nn.Parameter],
             adapter: str) -> Iterator[None]:
    """Only `adapter` active and `params` trainable, modules in train mode; all put back after."""
    grads = {id(p): (p, p.requires_grad) for p in model.parameters()}
    modes = [(module, module.training) for module in model.modules()]
    adapters: AdapterState | None = adapter_state(model)
    try:
        set_active(model, (adapter,))
        for parameter, _ in grads.values():
            parameter.requires_grad_(False)
        for parameter in params:
            parameter.requires_grad_(True)
        model.train()
        yield
    finally:
        for parameter in params:
            parameter.grad = None
        restore(model, adapters)
        for parameter, flag in grads.values():
            parameter.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode
