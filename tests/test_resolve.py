"""worker/models/resolve.py: local folders, adapter auto-detection, the refusals, and hub ids
resolved offline from a hub cache built by tests/support/models.build_hub_cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from schemas import (
    AdapterIncompatible,
    ModelNotFound,
    ModelRef,
    RemoteCodeNotAllowed,
    UnsafeWeights,
    UnsupportedModel,
)
from tests.support.models import (
    build_hub_cache,
    build_pickle_only_model,
    build_remote_code_model,
    build_unknown_arch,
)
from worker.models.resolve import fingerprint, resolve


def _ref(path: Path) -> ModelRef:
    return ModelRef(path=str(path))


def test_local_folder_resolves_to_itself(models: dict[str, Path]) -> None:
    resolved = resolve(_ref(models["mistral"]))
    assert resolved.base.path == models["mistral"] and resolved.adapter is None
    assert resolved.base.revision is None and resolved.base.fingerprint == fingerprint(models["mistral"])
    assert resolved.config["model_type"] == "mistral"
    assert resolved.base.identity == f"path:{models['mistral']}#{resolved.base.fingerprint}"


def test_adapter_folder_resolves_to_its_base(models: dict[str, Path]) -> None:
    resolved = resolve(_ref(models["qwen_lora"]))
    assert resolved.base.path == models["qwen2"]
    assert resolved.adapter is not None and resolved.adapter.path == models["qwen_lora"]
    assert resolved.adapter_config["peft_type"] == "LORA"


def test_folder_with_config_and_adapter_config_is_an_adapter_on_its_declared_base(
        models: dict[str, Path], tmp_path: Path) -> None:
    both = tmp_path / "both"
    shutil.copytree(models["lora"], both)
    shutil.copy(models["qwen2"] / "config.json", both / "config.json")
    resolved = resolve(_ref(both))
    assert resolved.base.path == models["llama"] and resolved.adapter is not None

    config = json.loads((both / "adapter_config.json").read_text())
    (both / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    shutil.copy(models["llama"] / "model.safetensors", both / "model.safetensors")
    shutil.copy(models["llama"] / "config.json", both / "config.json")
    resolved = resolve(_ref(both))  # no declared base: the folder is its own base
    assert resolved.base.path == both and resolved.adapter is not None


def test_refusals(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="is not a model folder"):
        resolve(ModelRef(path=str(tmp_path / "absent")))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(models["llama"] / "config.json", empty / "config.json")
    with pytest.raises(ModelNotFound, match="no weights"):
        resolve(_ref(empty))
    (empty / "config.json").unlink()
    with pytest.raises(ModelNotFound, match="is not a model folder"):
        resolve(_ref(empty))
    with pytest.raises(UnsafeWeights, match="pytorch_model.bin.*safetensors"):
        resolve(_ref(build_pickle_only_model(tmp_path / "pickle")))
    with pytest.raises(UnsupportedModel, match="not_a_real_arch"):
        resolve(_ref(build_unknown_arch(tmp_path / "unknown")))
    bert = tmp_path / "vit"
    shutil.copytree(build_unknown_arch(tmp_path / "u2"), bert)
    (bert / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(UnsupportedModel, match="no causal LM class"):
        resolve(_ref(bert))
    orphan = tmp_path / "orphan"
    shutil.copytree(models["lora"], orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": ""}))
    with pytest.raises(AdapterIncompatible, match="names no base"):
        resolve(_ref(orphan))
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "a/b/c"}))
    with pytest.raises(AdapterIncompatible, match="base_model_name_or_path"):
        resolve(_ref(orphan))


def test_remote_code_is_refused_before_any_of_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    folder = build_remote_code_model(tmp_path / "remote", marker)
    with pytest.raises(RemoteCodeNotAllowed, match="trust_remote_code") as info:
        resolve(_ref(folder))
    assert isinstance(info.value, PermissionError)
    assert resolve(_ref(folder), trust_remote_code=True).config["model_type"] == "modelq_custom"
    assert not marker.exists()


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline hub cache for this process (huggingface_hub read the env at import)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_resolve_offline_to_commit_hashes(models: dict[str, Path], hub_cache: Path) -> None:
    old = build_hub_cache(hub_cache, "org/tiny-llama", models["llama"], revision_commit="a" * 40,
                          branch="v1")
    new = build_hub_cache(hub_cache, "org/tiny-llama", models["mistral"])

    latest = resolve(ModelRef.model_validate("org/tiny-llama"))
    assert latest.base.revision == new and latest.base.repo_id == "org/tiny-llama"
    assert latest.config["model_type"] == "mistral" and latest.base.identity == f"hub:org/tiny-llama@{new}"
    for revision in ("v1", "a" * 40):
        pinned = resolve(ModelRef(repo_id="org/tiny-llama", revision=revision))
        assert pinned.base.revision == old and pinned.config["model_type"] == "llama"
        assert pinned.base.path == hub_cache / "models--org--tiny-llama" / "snapshots" / old

    with pytest.raises(ModelNotFound, match="org/absent"):
        resolve(ModelRef(repo_id="org/absent"))
    with pytest.raises(ModelNotFound, match="org/tiny-llama@dev"):
        resolve(ModelRef(repo_id="org/tiny-llama", revision="dev"))


def test_hub_adapter_repo_resolves_its_hub_base(models: dict[str, Path], hub_cache: Path,
                                                tmp_path: Path) -> None:
    base_commit = build_hub_cache(hub_cache, "org/tiny-llama", models["llama"])
    adapter = tmp_path / "adapter"
    shutil.copytree(models["lora"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "org/tiny-llama"}))
    build_hub_cache(hub_cache, "org/tiny-lora", adapter)

    resolved = resolve(ModelRef(repo_id="org/tiny-lora"))
    assert resolved.base.repo_id == "org/tiny-llama" and resolved.base.revision == base_commit
    assert resolved.adapter is not None and resolved.adapter.repo_id == "org/tiny-lora"


def test_fingerprint_keeps_its_digest_for_nested_folders_and_hub_symlinks(tmp_path: Path) -> None:
    """The scandir walk hashes what sorted Path.rglob did (artifacts are keyed by it)."""
    import hashlib

    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    for folder in (blobs, snap / "a-b", snap / "a"):
        folder.mkdir(parents=True)
    (blobs / "x").write_text("1")
    (snap / "config.json").symlink_to(blobs / "x")  # a hub snapshot links to its blobs
    (snap / "a-b" / "f").write_text("22")
    (snap / "a" / "g").write_text("333")
    (snap / "linked").symlink_to(blobs, target_is_directory=True)  # not followed
    digest = hashlib.sha256()
    for file in sorted(p for p in snap.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(snap)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    assert fingerprint(snap) == digest.hexdigest()[:16]
    (snap / "a" / "g").write_text("4444")
    assert fingerprint(snap) != digest.hexdigest()[:16]


def test_a_folder_that_passed_is_checked_again_once_its_files_change(
        models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "llama"
    shutil.copytree(models["llama"], folder)
    assert resolve(_ref(folder)).config["model_type"] == "llama"
    assert resolve(_ref(folder)).config["model_type"] == "llama"  # remembered
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelNotFound, match="no weights"):
        resolve(_ref(folder))
