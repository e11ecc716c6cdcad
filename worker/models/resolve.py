"""Resolving a ModelRef to a folder of safetensors on local disk, as from_pretrained would.

Handles local folders and hub repo ids (through huggingface_hub: its cache, offline
mode, revision to commit), adapter auto-detection, the safetensors-only rule and
the remote-code rule. A folder holding both `config.json` and `adapter_config.json`
is an adapter whose base is `base_model_name_or_path` (as from_pretrained treats
it); when that field is empty, the folder itself is the base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

from schemas import ModelRef
from schemas.errors import (
    AdapterIncompatible,
    ModelNotFound,
    RemoteCodeNotAllowed,
    UnsafeWeights,
    UnsupportedModel,
)
from worker.access import OPEN, Access
from worker.errors import translate

log = logging.getLogger(__name__)

CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]

TqdmFactory = Callable[..., Any]


@dataclass(frozen=True)
class Source:
    """A resolved folder: where its files are and which revision they are."""

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None  # a commit hash for hub repos
    fingerprint: str | None = None  # local folders: names, sizes and mtimes hashed

    @property
    def identity(self) -> str:
        """What makes two loads the same base: repo and commit, or path and fingerprint."""
        if self.repo_id is not None:
            return f"hub:{self.repo_id}@{self.revision}"
        return f"path:{self.path}#{self.fingerprint}"


@dataclass(frozen=True)
class Resolved:
    """A base model ready to load, and the adapter that named it, if any."""

    base: Source
    config: dict[str, Any]
    adapter: Source | None = None
    adapter_config: dict[str, Any] = field(default_factory=dict)


def fetch(ref: ModelRef, *, access: Access = OPEN, tqdm_class: TqdmFactory | None = None,
          allow_code: bool = False) -> Source:
    """Find `ref`'s folder: a local path as given, or a hub snapshot (downloaded if needed)."""
    if ref.path is not None:
        path = Path(os.path.expanduser(ref.path)).resolve()
        access.check_path(ref.path, path)  # a tenant's roots, checked before anything there is read
        if not path.is_dir():
            raise not_a_model_folder(ref.path)
        return Source(ref=ref.path, path=path, fingerprint=fingerprint(path))
    assert ref.repo_id is not None
    patterns = HUB_PATTERNS + (["*.py"] if allow_code else []) + (["*.bin"] if access.allow_pickle else [])
    try:
        folder = snapshot_download(ref.repo_id, revision=ref.revision, token=access.token,
                                   allow_patterns=patterns,
                                   tqdm_class=tqdm_class)  # type: ignore[arg-type]
    except Exception as exc:
        raise translate(exc, ref=ref.display) from exc
    path = Path(folder)
    return Source(ref=ref.display, path=path, repo_id=ref.repo_id, revision=path.name)


def resolve(ref: ModelRef, *, trust_remote_code: bool = False, access: Access = OPEN,
            tqdm_class: TqdmFactory | None = None) -> Resolved:
    """Resolve `ref` to a loadable base, following an adapter to its base model."""
    source = fetch(ref, access=access, tqdm_class=tqdm_class, allow_code=trust_remote_code)
    if (source.path / ADAPTER_CONFIG).is_file():
        adapter_config = read_json(source.path / ADAPTER_CONFIG)
        base_name = adapter_config.get("base_model_name_or_path")
        if not base_name:
            if not (source.path / CONFIG).is_file():
                raise AdapterIncompatible(f"adapter {source.ref} names no base model "
                                          "(base_model_name_or_path): load the base and attach it")
            base = source
        else:
            base_ref = base_of(source.ref, str(base_name))
            base = fetch(base_ref, access=access, tqdm_class=tqdm_class, allow_code=trust_remote_code)
            if (base.path / ADAPTER_CONFIG).is_file() and not (base.path / CONFIG).is_file():
                raise AdapterIncompatible(f"the base of adapter {source.ref}, {base_name}, is "
                                          "itself an adapter: stacked adapters are not supported")
        return Resolved(base=base, config=check_model(base, trust_remote_code, access.allow_pickle),
                        adapter=source, adapter_config=adapter_config)
    return Resolved(base=source, config=check_model(source, trust_remote_code, access.allow_pickle))


_CHECKED: dict[tuple[Path, str, bool, bool], dict[str, Any]] = {}
"""check_model's passed local folders by (path, fingerprint, trust_remote_code, pickle allowed);
a folder whose files changed has another fingerprint. Bounded: cleared when full."""


def check_model(source: Source, trust_remote_code: bool, allow_pickle: bool = False) -> dict[str, Any]:
    """The folder's config (shared: read it, don't change it), once it has safetensors weights
    and a usable architecture; a local folder that passed before is not read again.

    Pickle-only folders are refused unless the tenant's policy allows pickle weights.
    """
    key = None
    if source.fingerprint is not None:
        key = (source.path, source.fingerprint, trust_remote_code, allow_pickle)
        if key in _CHECKED:
            return _CHECKED[key]
    config = _check_model(source, trust_remote_code, allow_pickle)
    if key is not None:
        if len(_CHECKED) >= 256:
            _CHECKED.clear()
        _CHECKED[key] = config
    return config


def _check_model(source: Source, trust_remote_code: bool, allow_pickle: bool) -> dict[str, Any]:
    if not (source.path / CONFIG).is_file():
        raise not_a_model_folder(source.ref)
    files = [p.name for p in source.path.iterdir()]
    if not any(name.endswith(".safetensors") for name in files):
        if any(name.endswith(PICKLE_SUFFIXES) for name in files) and not allow_pickle:
            raise UnsafeWeights(f"{source.ref} has only pickle weights ({_pickles(files)}), which "
                                "can run code when loaded: convert them to safetensors",
                                ref=source.ref)
        if not any(name.endswith(PICKLE_SUFFIXES) for name in files):
            raise ModelNotFound(f"{source.ref} has no weights (no *.safetensors file)",
                                ref=source.ref)
        log.warning("loading pickle weights from %s: the tenant's policy allows them", source.ref)
    config = read_json(source.path / CONFIG)
    check_architecture(source.ref, config, trust_remote_code)
    return config


def check_architecture(ref: str, config: dict[str, Any], trust_remote_code: bool) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # type: ignore[attr-defined]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    auto_map = config.get("auto_map") or {}
    model_type = config.get("model_type")
    if auto_map.get("AutoModelForCausalLM") or model_type not in CONFIG_MAPPING_NAMES:
        if auto_map:
            if not trust_remote_code:
                raise RemoteCodeNotAllowed(
                    f"{ref} needs custom code from its repo (auto_map); allow it with "
                    "trust_remote_code on a pinned commit revision, or use a built-in architecture",
                    ref=ref)
            return
        raise UnsupportedModel(f"{ref} has model_type {model_type!r}, which this transformers does "
                               "not know: use a supported architecture or upgrade transformers",
                               ref=ref)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModel(f"{ref} is a {model_type!r} model, which has no causal LM class: "
                               "modelq loads causal language models", ref=ref)


def fingerprint(path: Path) -> str:
    """A hash of the folder's file names, sizes and modification times (no contents read).

    Runs on every job (a cache hit included), so it walks with os.scandir rather than
    Path.rglob; files are taken in the order of their path parts, as sorted Paths were.
    """
    found: list[tuple[tuple[str, ...], os.stat_result]] = []
    folders: list[tuple[str, ...]] = [()]
    while folders:
        parts = folders.pop()
        with os.scandir(os.path.join(path, *parts)) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append((*parts, entry.name))
                elif entry.is_file():
                    found.append(((*parts, entry.name), entry.stat()))
    digest = hashlib.sha256()
    for parts, stat in sorted(found, key=lambda item: item[0]):
        digest.update(f"{'/'.join(parts)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def not_a_model_folder(ref: str) -> ModelNotFound:
    """The one error for a path that holds no model: missing, a file, or a folder without
    config.json read the same, so the message tells nothing about what else is there."""
    return ModelNotFound(f"{ref} is not a model folder on this worker (a folder holding "
                         "config.json and weights): give the path of one", ref=ref)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelNotFound(f"{path} does not hold a JSON object")
    return data


def base_of(adapter: str, base_name: str) -> ModelRef:
    """An adapter's base_model_name_or_path as a ref: an absolute path or a hub repo id."""
    try:
        return ModelRef.model_validate(base_name)
    except ValueError as exc:
        raise AdapterIncompatible(
            f"adapter {adapter} names base {base_name!r}, which is neither an absolute path nor a "
            "hub repo id: fix base_model_name_or_path in its adapter_config.json") from exc


def _pickles(files: list[str]) -> str:
    return ", ".join(sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))[:3])
