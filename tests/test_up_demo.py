"""`modelq up` and `modelq demo` as a user runs them: subprocesses on a clean home, no Redis URL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.client import Client
from tasks.embedded import UpState, read_state, state_path, write_state
from tasks.settings import DEFAULT_REDIS_URL, Settings
from tasks.up import default_devices, visible_gpus


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MODELQ_REDIS_URL", raising=False)
    return tmp_path / "modelq-home"


def clean_env(home: Path) -> dict[str, str]:
    """A fresh user: HOME and MODELQ_HOME in a temp folder, no Redis configured, no GPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELQ_")}
    env.update(HOME=str(home.parent), MODELQ_HOME=str(home), CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", COLUMNS="120")
    return env


def processes_of(home: Path) -> list[int]:
    """Pids of live processes started for this home (they carry MODELQ_HOME in their environment)."""
    marker = f"MODELQ_HOME={home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if marker in environ.split(b"\0") and stat.split(") ", 1)[-1][:1] != "Z":
            pids.append(int(entry.name))
    return pids


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def modelq(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


# --- Settings finds the embedded Redis ------------------------------------------------------


def test_settings_find_a_live_up_and_ignore_a_stale_one(home: Path) -> None:
    assert Settings(home=home).redis_url == DEFAULT_REDIS_URL
    write_state(home, UpState(redis_url="redis://:pw@127.0.0.1:1234/0", pid=os.getpid(), redis_pid=None))
    assert Settings(home=home).redis_url == "redis://:pw@127.0.0.1:1234/0"
    assert not Settings(home=home).redis_configured
    assert state_path(home).stat().st_mode & 0o777 == 0o600  # the URL holds a password
    explicit = Settings(home=home, redis_url="redis://elsewhere:6379/0")
    assert explicit.redis_url == "redis://elsewhere:6379/0" and explicit.redis_configured

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    write_state(home, UpState(redis_url="redis://127.0.0.1:1/0", pid=int(dead.stdout), redis_pid=None))
    assert read_state(home) is None
    assert Settings(home=home).redis_url == DEFAULT_REDIS_URL


def test_gpus_are_counted_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == 2 and default_devices() == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert default_devices() == ["cpu"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == 0


# --- the demo's folder and what it shows ------------------------------------------------------


def check_demo_steps(out: str, home: Path) -> None:
    """Generation with and without the adapter shown, the loss going down, the saved adapter attached."""
    generated = dict(re.findall(r"^  (base alone|with adapter demo|with fresh-trained): +(.+)$", out, re.M))
    assert set(generated) == {"base alone", "with adapter demo", "with fresh-trained"}, out
    assert all(text.startswith("the worker") for text in generated.values()), generated
    first, last = (float(x) for x in re.findall(r"^  loss ([\d.]+) -> ([\d.]+) \(went down\)", out, re.M)[0])
    assert last < first, out
    trained = home / "demo" / "trained"
    assert (trained / "adapter_config.json").is_file() and (trained / "adapter_model.safetensors").is_file()
    assert f"attaching {trained} as 'fresh-trained'" in out, out


def test_demo_model_has_a_tokenizer_that_fits_it_and_old_folders_are_rebuilt(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from worker.demo import DEMO_LINES, build_demo

    root = tmp_path / "demo"
    (root / "model").mkdir(parents=True)
    (root / ".built").touch()  # a v1 folder: no tokenizer
    demo = build_demo(root)
    tokenizer = AutoTokenizer.from_pretrained(demo.model)
    assert len(tokenizer) <= AutoConfig.from_pretrained(demo.model).vocab_size
    ids = tokenizer(DEMO_LINES[0])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == DEMO_LINES[0]
    assert len(demo.dataset.read_text().splitlines()) == len(DEMO_LINES)
    assert (demo.adapter / "adapter_config.json").is_file()
    before = (demo.model / "model.safetensors").stat().st_mtime_ns
    assert build_demo(root) == demo and (demo.model / "model.safetensors").stat().st_mtime_ns == before


# --- up, then demo and ls on it, then Ctrl-C ---------------------------------------------------


@pytest.fixture
def up(home: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "up"], env=clean_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for pid in processes_of(home):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
def test_up_serves_other_commands_and_stops_cleanly_on_ctrl_c(home: Path,
                                                              up: subprocess.Popen[str]) -> None:
    wait_for(lambda: read_state(home) is not None or up.poll() is not None, 60, "up.json")
    assert up.poll() is None, up.stdout.read() if up.stdout else ""
    settings = Settings(home=home)  # no URL given: found through up.json
    assert settings.redis_url.startswith("redis://:") and "127.0.0.1" in settings.redis_url
    client = Client(settings)
    wait_for(lambda: client.workers() or up.poll() is not None, 120, "a worker registered")
    assert [w.device for w in client.workers()] == ["cpu"]

    env = clean_env(home)
    listed = modelq("ls", "--json", env=env, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [w["device"] for w in json.loads(listed.stdout)] == ["cpu"]

    demo = modelq("demo", env=env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "starting modelq up" not in demo.stdout  # it used the running pool
    for row in ("status        succeeded", "quantization  nf4", "adapters      demo, fresh, fresh-trained",
                "model_key"):
        assert row in demo.stdout, demo.stdout
    check_demo_steps(demo.stdout, home)

    state = read_state(home)
    assert state is not None
    children = [p for p in (state.redis_pid, *state.workers) if p]
    up.send_signal(signal.SIGINT)
    out, _ = up.communicate(timeout=90)
    assert up.returncode == 0, out
    assert "modelq up: stopped" in out
    assert not state_path(home).exists()
    assert processes_of(home) == []
    assert all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
               for pid in children)
    assert list((home / "redis").glob("appendonly.aof*")), "the embedded Redis keeps an AOF"


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_on_a_fresh_machine_starts_and_stops_its_own_pool(home: Path) -> None:
    demo = modelq("demo", env=clean_env(home))
    try:
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "starting modelq up" in demo.stdout
        assert "status        succeeded" in demo.stdout and "adapters      demo" in demo.stdout
        assert not state_path(home).exists()
        assert processes_of(home) == []
    finally:
        for pid in processes_of(home):
            os.kill(pid, signal.SIGKILL)
