"""Translating third-party errors (hub, torch, transformers, peft) into modelq's hierarchy.

The one place a foreign exception becomes a ModelqError with a message that says
what to change. Secrets are scrubbed from every message that leaves here.
"""

from __future__ import annotations

import re

from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub

from schemas.errors import (
    AccessDenied,
    AdapterIncompatible,
    HubUnavailable,
    InsufficientMemory,
    LoadFailed,
    ModelNotFound,
    ModelqError,
    UnsupportedModel,
)

_SECRET = re.compile(r"(hf_[A-Za-z0-9]{6,}|(?<=://)[^/@\s]+(?=@))")


def scrub(text: str) -> str:
    """Hide hub tokens and URL credentials."""
    return _SECRET.sub("***", text)


def translate(exc: BaseException, *, ref: str = "") -> ModelqError:
    """A ModelqError for `exc`, raised while working on `ref`."""
    if isinstance(exc, ModelqError):
        return exc
    text = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if isinstance(exc, hub.GatedRepoError):
        return AccessDenied(f"{ref} is gated: accept its terms on the hub and give the worker a "
                            "token that may read it", ref=ref)
    if isinstance(exc, hub.RepositoryNotFoundError):
        return ModelNotFound(f"repository {ref} not found (or private): check the id, or give the "
                             "worker a token that may read it", ref=ref)
    if isinstance(exc, hub.RevisionNotFoundError):
        return ModelNotFound(f"revision not found in {ref}: use an existing branch, tag or "
                             "commit", ref=ref)
    if isinstance(exc, hub.LocalEntryNotFoundError) or _is_network(exc):
        return _unreachable(ref, text)
    if isinstance(exc, hub.EntryNotFoundError):
        return ModelNotFound(f"a file is missing from {ref} on the hub: {text}", ref=ref)
    if isinstance(exc, hub.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return AccessDenied(f"the hub refused access to {ref} ({status}): give the worker a "
                                "token that may read it", ref=ref)
        return LoadFailed(f"the hub failed while fetching {ref}: {text}", ref=ref)
    if _is_oom(exc):
        return InsufficientMemory(f"out of memory while loading {ref}: free memory, pick a "
                                  "smaller quantization or another worker", ref=ref)
    if isinstance(exc, (ValueError, KeyError)) and "Unrecognized configuration class" in text:
        return UnsupportedModel(f"{ref} is not a causal language model transformers knows "
                                f"({text}): use a model with a *ForCausalLM class", ref=ref)
    if isinstance(exc, (ValueError, RuntimeError)) and _adapter_mismatch(scrub(str(exc))):
        return _adapter_incompatible(scrub(str(exc)), text, ref)
    return LoadFailed(f"loading {ref} failed: {type(exc).__name__}: {text}", ref=ref)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - the worker always has torch
        return False
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _unreachable(ref: str, text: str) -> ModelqError:
    """Not in the cache and no hub: for good while HF_HUB_OFFLINE is set (not retryable),
    else until the network is back (retryable)."""
    if hub_constants.HF_HUB_OFFLINE:
        return ModelNotFound(f"{ref} is not in the worker's hub cache and HF_HUB_OFFLINE is set: "
                             "download it into the cache first, or unset HF_HUB_OFFLINE", ref=ref)
    return HubUnavailable(f"the hub cannot be reached to fetch {ref}, and it is not in the "
                          f"worker's hub cache ({text}): try again when the network is back",
                          ref=ref)


_NETWORK = {("httpx", "TransportError"), ("requests", "ConnectionError"), ("requests", "Timeout")}


def _is_network(exc: BaseException) -> bool:
    """A connection failure or timeout talking to the hub (httpx, or requests on old hubs)."""
    if isinstance(exc, hub.OfflineModeIsEnabled):
        return True
    return any((t.__module__.split(".")[0], t.__name__) in _NETWORK for t in type(exc).__mro__)


_SIZE_MISMATCH = re.compile(r"size mismatch for (?P<tensor>\S+): copying a param with shape "
                            r"torch\.Size\(\[(?P<adapter>[^\]]*)\]\) from checkpoint, the shape in "
                            r"current model is torch\.Size\(\[(?P<model>[^\]]*)\]\)")


def _adapter_incompatible(full: str, first_line: str, ref: str) -> AdapterIncompatible:
    """AdapterIncompatible naming the first mismatched tensor and both shapes, when torch said."""
    found = _SIZE_MISMATCH.search(full)
    if found is None:
        return AdapterIncompatible(f"the adapter does not fit the model: {first_line}", ref=ref)
    tensor = found["tensor"].rstrip(":")
    adapter = [int(n) for n in found["adapter"].split(",") if n.strip()]
    model = [int(n) for n in found["model"].split(",") if n.strip()]
    return AdapterIncompatible(
        f"adapter {ref} does not fit this model: tensor {tensor} is {adapter} in the adapter but "
        f"{model} in the model, so it was trained on a base of another size: attach it to the "
        "model it was built for", ref=ref, tensor=tensor, adapter_shape=adapter, model_shape=model)


def _adapter_mismatch(text: str) -> bool:
    return any(s in text for s in ("Target modules", "size mismatch", "not found in the base model"))


_POISON_TEXT = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS_EXECUTION_FAILED",
                "unspecified launch failure")


def poisons_process(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) leaves the CUDA context unusable for this process.

    A device-side assert or an illegal memory access poisons the context: every later
    CUDA call fails, so the worker must exit and be restarted. Out-of-memory does not.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if not _is_oom(current) and "out of memory" not in text and (
                type(current).__name__ == "AcceleratorError"
                or (isinstance(current, RuntimeError) and any(s in text for s in _POISON_TEXT))):
            return True
        current = current.__cause__ or current.__context__
    return False
