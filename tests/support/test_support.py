"""Proves the test-support builders and RedisServer do what other tests rely on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import redis
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from tests.support.models import (
    build_hub_cache,
    build_lora,
    build_model,
    build_pickle_only_model,
    build_remote_code_model,
    build_unknown_arch,
    hub_repo_folder,
)
from tests.support.redis_server import RedisServer, RedisServerError

pytestmark = pytest.mark.timeout(60)

INPUT_IDS = torch.tensor([[1, 5, 17, 42, 99, 3]])
SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(INPUT_IDS).logits
    return result


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def llama(models_dir: Path) -> Path:
    return build_model("llama", models_dir / "llama")


@pytest.fixture(scope="module")
def lora(llama: Path, models_dir: Path) -> Path:
    return build_lora(llama, models_dir / "lora")


# -- causal LMs ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_build_model_loads_small_safetensors(kind: str, tmp_path: Path) -> None:
    folder = build_model(kind, tmp_path / kind)  # type: ignore[arg-type]

    model = AutoModelForCausalLM.from_pretrained(folder)

    assert model.config.model_type == kind
    assert (folder / "model.safetensors").is_file()
    assert sum(f.stat().st_size for f in folder.iterdir()) < 1_000_000
    assert logits(model).shape == (1, INPUT_IDS.shape[1], 256)


def test_build_model_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = build_model("llama", tmp_path / "a", seed=3)
    second = build_model("llama", tmp_path / "b", seed=3)
    other = build_model("llama", tmp_path / "c", seed=4)

    weights = [(f / "model.safetensors").read_bytes() for f in (first, second, other)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]


def test_sharded_model_has_several_shards_and_same_weights(llama: Path, tmp_path: Path) -> None:
    folder = build_model("llama", tmp_path / "sharded", sharded=True)

    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2
    assert all(SHARD_NAME.fullmatch(name) for name in shards)
    assert set(index["weight_map"].values()) == set(shards)
    assert not (folder / "model.safetensors").exists()
    sharded_logits = logits(AutoModelForCausalLM.from_pretrained(folder))
    torch.testing.assert_close(sharded_logits, logits(AutoModelForCausalLM.from_pretrained(llama)))


def test_tied_model_shares_embeddings(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(build_model("qwen2", tmp_path / "tied", tie=True))

    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# -- adapters -----------------------------------------------------------------


def test_lora_changes_logits_and_names_its_base(llama: Path, lora: Path) -> None:
    config = json.loads((lora / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(llama)
    base_logits = logits(base)

    adapted = PeftModel.from_pretrained(base, lora)

    assert config["base_model_name_or_path"] == str(llama)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert (lora / "adapter_model.safetensors").is_file()
    assert (logits(adapted) - base_logits).abs().max() > 1e-2


def test_lora_folder_auto_loads_its_base_through_transformers(llama: Path, lora: Path) -> None:
    expected = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), lora))

    model = AutoModelForCausalLM.from_pretrained(lora)

    assert "default" in model.peft_config
    torch.testing.assert_close(logits(model), expected)


def test_lora_base_name_is_written_verbatim(llama: Path, tmp_path: Path) -> None:
    folder = build_lora(
        llama, tmp_path / "named", r=2, target_modules=("o_proj",), seed=1, base_name="org/base"
    )

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base"
    assert config["r"] == 2
    assert config["target_modules"] == ["o_proj"]


# -- folders the worker must refuse -------------------------------------------


def test_pickle_only_model_has_no_safetensors(tmp_path: Path) -> None:
    folder = build_pickle_only_model(tmp_path / "pickle")

    assert not list(folder.rglob("*.safetensors"))
    assert (folder / "pytorch_model.bin").is_file()
    assert AutoConfig.from_pretrained(folder).model_type == "llama"
    assert "model.embed_tokens.weight" in torch.load(folder / "pytorch_model.bin", weights_only=True)


def test_remote_code_is_refused_without_trust_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "remote-code-ran"
    folder = build_remote_code_model(tmp_path / "remote", marker)

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(folder)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(folder)

    assert json.loads((folder / "config.json").read_text())["model_type"] == "modelq_custom"
    assert not marker.exists()


def test_remote_code_runs_and_loads_when_trusted(tmp_path: Path) -> None:
    # A subprocess, so transformers' module cache (HF_MODULES_CACHE, read at import) stays in tmp_path.
    marker = tmp_path / "remote-code-ran"
    folder = build_remote_code_model(tmp_path / "remote", marker)
    script = textwrap.dedent(
        f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print(type(model).__name__)
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}

    done = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "CustomForCausalLM"
    assert "configuration_custom imported" in marker.read_text()
    assert "modeling_custom imported" in marker.read_text()


def test_unknown_architecture_is_rejected(tmp_path: Path) -> None:
    folder = build_unknown_arch(tmp_path / "unknown")

    assert (folder / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="not_a_real_arch"):
        AutoConfig.from_pretrained(folder)


# -- hub cache ----------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache, with offline mode on for this process and its children.

    The env vars only reach subprocesses: huggingface_hub copied them into
    ``constants`` at import, so the constants are patched too.
    """
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_cache_layout_matches_huggingface_hub(llama: Path, offline_hub: Path) -> None:
    commit = build_hub_cache(offline_hub, "org/tiny-llama", llama)

    storage = offline_hub / "models--org--tiny-llama"
    snapshot = storage / "snapshots" / commit
    weights = snapshot / "model.safetensors"
    config = snapshot / "config.json"
    assert hub_repo_folder("org/tiny-llama") == huggingface_hub.file_download.repo_folder_name(
        repo_id="org/tiny-llama", repo_type="model"
    )
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert (storage / "refs" / "main").read_text() == commit
    assert weights.is_symlink() and os.readlink(weights).startswith("../../blobs/")
    assert re.fullmatch(r"[0-9a-f]{64}", Path(os.readlink(weights)).name)  # LFS: sha256 etag
    assert re.fullmatch(r"[0-9a-f]{40}", Path(os.readlink(config)).name)  # git blob sha1
    assert weights.read_bytes() == (llama / "model.safetensors").read_bytes()
    cached = {f.path for f in huggingface_hub.get_cached_repo_tree("org/tiny-llama")}
    assert cached == {p.name for p in llama.iterdir()}


def test_hub_cache_resolves_offline_by_branch_and_commit(llama: Path, offline_hub: Path) -> None:
    commit = build_hub_cache(offline_hub, "org/tiny-llama", llama)
    expected = str(offline_hub / "models--org--tiny-llama" / "snapshots" / commit)

    assert huggingface_hub.snapshot_download("org/tiny-llama") == expected
    assert huggingface_hub.snapshot_download("org/tiny-llama", revision=commit) == expected
    assert (
        huggingface_hub.snapshot_download("org/tiny-llama", revision="main", cache_dir=offline_hub)
        == expected
    )
    assert huggingface_hub.hf_hub_download("org/tiny-llama", "config.json") == f"{expected}/config.json"
    model = AutoModelForCausalLM.from_pretrained("org/tiny-llama", revision=commit)
    torch.testing.assert_close(logits(model), logits(AutoModelForCausalLM.from_pretrained(llama)))


def test_hub_cache_holds_two_revisions(llama: Path, offline_hub: Path, tmp_path: Path) -> None:
    other = build_model("llama", tmp_path / "other", seed=7)
    old = build_hub_cache(offline_hub, "org/tiny-llama", llama, revision_commit="a" * 40)
    new = build_hub_cache(offline_hub, "org/tiny-llama", other)

    assert new != old
    assert huggingface_hub.snapshot_download("org/tiny-llama").endswith(new)
    assert huggingface_hub.snapshot_download("org/tiny-llama", revision=old).endswith(old)


def test_hub_cache_misses_are_local_errors(llama: Path, offline_hub: Path) -> None:
    commit = build_hub_cache(offline_hub, "org/tiny-llama", llama)

    with pytest.raises(LocalEntryNotFoundError):
        huggingface_hub.snapshot_download("org/absent")
    with pytest.raises(LocalEntryNotFoundError):
        huggingface_hub.snapshot_download("org/tiny-llama", revision="dev")
    (offline_hub / "models--org--tiny-llama" / "snapshots" / commit / "model.safetensors").unlink()
    with pytest.raises(IncompleteSnapshotError):  # the trees/ listing says a file is missing
        huggingface_hub.snapshot_download("org/tiny-llama")


def test_hub_cache_resolves_from_env_alone_in_a_fresh_process(llama: Path, offline_hub: Path) -> None:
    commit = build_hub_cache(offline_hub, "org/tiny-llama", llama)
    script = "import huggingface_hub; print(huggingface_hub.snapshot_download('org/tiny-llama'))"

    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=30
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(f"/snapshots/{commit}")


# -- redis --------------------------------------------------------------------


@pytest.fixture
def aof_server() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True, appendfsync="always") as server:
        yield server


def test_redis_server_starts_answers_and_cleans_up() -> None:
    with RedisServer() as server:
        data_dir = server.data_dir
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("save") == {"save": ""}
        client.close()
    assert not server.running
    assert not data_dir.exists()


def test_redis_restart_keeps_port_and_aof_data(aof_server: RedisServer) -> None:
    port = aof_server.port
    aof_server.client().set("job:1", "queued")

    aof_server.restart()

    assert aof_server.port == port
    assert aof_server.client().get("job:1") == b"queued"


def test_redis_kill_drops_connections_and_aof_survives_it(aof_server: RedisServer) -> None:
    client = aof_server.client(socket_timeout=1)
    client.set("job:1", "running")
    pid = aof_server.pid

    aof_server.kill()

    assert not aof_server.running
    with pytest.raises(redis.ConnectionError):
        client.ping()
    aof_server.start()
    assert aof_server.pid != pid
    assert aof_server.client().get("job:1") == b"running"


def test_redis_without_aof_forgets_on_restart() -> None:
    with RedisServer(appendonly=False) as server:
        server.client().set("job:1", "queued")
        server.restart()
        assert server.client().get("job:1") is None


def test_redis_start_failure_reports_the_log_tail() -> None:
    server = RedisServer(extra_args=["--no-such-option", "x"], startup_timeout=5)
    try:
        with pytest.raises(RedisServerError, match="(?s)exited with code.*no-such-option"):
            server.start()
        assert not server.running
    finally:
        server.close()
