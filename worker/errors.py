"""Translating third-party errors (hub, torch, transformers, peft) into modelq's hierarchy.

The one place a foreign exception becomes a ModelqError with a message that says
what to change. Secrets are scrubbed from every message that leaves here.
"""

from __future__ import annotations

import re

from huggingface_hub import errors as hub

from schemas.errors import (
    AccessDenied,
    AdapterIncompatible,
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
    if isinstance(exc, hub.LocalEntryNotFoundError):
        return ModelNotFound(f"{ref} is not in the hub cache and the hub cannot be reached "
                             "(offline): download it first or unset HF_HUB_OFFLINE", ref=ref)
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
    if isinstance(exc, (ValueError, RuntimeError)) and _adapter_mismatch(text):
        return AdapterIncompatible(f"the adapter does not fit the model: {text}", ref=ref)
    return LoadFailed(f"loading {ref} failed: {type(exc).__name__}: {text}", ref=ref)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - the worker always has torch
        return False
    return isinstance(exc, torch.cuda.OutOfMemoryError)


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
