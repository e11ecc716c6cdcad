"""What crosses a task's edges: its result as JSON, the paths it may touch, the tokenizer it reads.

`to_json` turns a task's return into plain JSON or says where it is not;
`paths_under` is a simple tenant path check (the runner may pass its own);
`TokenizerCache` loads a base model's tokenizer from its folder once per model key.
No Redis and no records here.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from schemas.errors import AccessDenied, TaskFailed, UnsupportedModel

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class PathResolver(Protocol):
    """The tenant's path check: the absolute path, or AccessDenied outside the tenant's roots."""

    def __call__(self, path: str | Path, *, for_writing: bool) -> Path: ...


def no_paths(path: str | Path, *, for_writing: bool) -> Path:
    """The PathResolver that allows nothing (a context built without one)."""
    raise AccessDenied(f"tasks may name no local paths on this worker (asked for {path})", path=str(path))


def paths_under(*roots: str | Path) -> PathResolver:
    """A PathResolver allowing paths under `roots` only (symlinks resolved first)."""
    bases = [Path(root).resolve() for root in roots]

    def resolve(path: str | Path, *, for_writing: bool) -> Path:
        resolved = Path(path).expanduser().resolve()
        if not any(resolved == base or base in resolved.parents for base in bases):
            verb = "write" if for_writing else "read"
            raise AccessDenied(f"a task may not {verb} {path}: it is outside the tenant's roots",
                               path=str(path))
        return resolved
    return resolve


def to_json(value: Any, *, task: str, where: str = "result") -> Any:
    """`value` as plain JSON: numpy and torch scalars (0-d tensors) as numbers, tuples as lists.

    TaskFailed for anything else, NaN and infinities included (JSON cannot hold them).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _not_json(task, where, f"the float {value}, which JSON cannot hold,")
        return float(value)
    if (isinstance(value, torch.Tensor) and value.dim() == 0) or _is_numpy_scalar(value):
        return to_json(value.item(), task=task, where=where)
    if isinstance(value, (list, tuple)):
        return [to_json(v, task=task, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _not_json(task, where, f"a dict key {key!r} ({type(key).__name__})")
            out[key] = to_json(item, task=task, where=f"{where}[{key!r}]")
        return out
    hint = " (for a tensor or an array, return .tolist())" if hasattr(value, "tolist") else ""
    raise _not_json(task, where, f"a {type(value).__name__}{hint}")


def _is_numpy_scalar(value: Any) -> bool:
    return type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item")


def _not_json(task: str, where: str, what: str) -> TaskFailed:
    message = (f"task {task} returned {what} at {where}, which is not JSON: return dicts, lists, "
               "strings, finite numbers, booleans or None")
    return TaskFailed(message, task=task, exception_type="NotJSON", exception_message=message)


def no_tokenizer(model_key: str, folder: str | Path | None = None) -> UnsupportedModel:
    where = f" (no {' / '.join(TOKENIZER_FILES)} in {folder})" if folder is not None else ""
    return UnsupportedModel(
        f"model {model_key} has no tokenizer{where}: save one beside the weights with "
        "tokenizer.save_pretrained(folder), or run a task that needs no tokenizer", model_key=model_key)


def load_tokenizer(folder: str | Path, model_key: str = "") -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model's folder, from local files only, no remote code."""
    path = Path(folder)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise no_tokenizer(model_key, path)
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise UnsupportedModel(f"the tokenizer of model {model_key} in {path} does not load "
                               f"({type(exc).__name__}: {exc}): save it again with "
                               "tokenizer.save_pretrained", model_key=model_key) from exc
    return tokenizer


class TokenizerCache:
    """Tokenizers by model key, each loaded from its base's folder on first use, once."""

    def __init__(self, load: Callable[[Path, str], PreTrainedTokenizerBase] = load_tokenizer) -> None:
        self._load = load
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._lock = threading.Lock()

    def loader(self, model_key: str, folder: str | Path) -> Callable[[], PreTrainedTokenizerBase]:
        """A `TaskHooks.load_tokenizer` for the model `model_key`, whose base lies in `folder`."""
        def load() -> PreTrainedTokenizerBase:
            with self._lock:
                tokenizer = self._tokenizers.get(model_key)
                if tokenizer is None:
                    tokenizer = self._tokenizers[model_key] = self._load(Path(folder), model_key)
                    log.info("model %s: tokenizer loaded from %s", model_key, folder)
                return tokenizer
        return load

    def forget(self, model_key: str) -> None:
        """Drop a model's tokenizer (when the model leaves the cache)."""
        with self._lock:
            self._tokenizers.pop(model_key, None)
