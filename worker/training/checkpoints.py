"""Resumable training state on disk: one folder per job, a `checkpoint-N` folder per saved step.

A checkpoint holds what HF Trainer's do: the adapter's weights (safetensors), the
optimizer's and scheduler's state, the RNG states (torch, and CUDA where used; python's
`random` in the JSON state) and the trainer state (step, data position, losses so far).
It is written under a hidden temporary name and renamed into place once complete, and
`trainer_state.json` is its last file: a worker killed mid-write leaves a `.tmp-` folder
that `latest` never picks (and the next save clears). Nothing here knows the model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
WEIGHTS_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pth"
_NAME = re.compile(rf"{PREFIX}(\d+)")


@dataclass
class Checkpoint:
    """The state of a run after `step` optimizer steps."""

    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]  # JSON: data position, losses, eval losses, python's RNG, the job's options


class CheckpointStore:
    """The checkpoints of one job in `folder` (created on first save)."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder = folder
        self.keep = keep

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = _NAME.fullmatch(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint; None when there is none (or none readable)."""
        for step in reversed(self.steps()):
            try:
                return self._read(step)
            except (OSError, ValueError, RuntimeError) as exc:  # a damaged one: try the one before
                log.warning("checkpoint %s unreadable (%s): trying an older one", self._path(step), exc)
        return None

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write `checkpoint` atomically, then keep only the newest `keep`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a write killed half way
        scratch = self.folder / f".tmp-{PREFIX}{checkpoint.step}-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in checkpoint.weights.items()},
                  str(scratch / WEIGHTS_FILE))
        torch.save(checkpoint.optimizer, scratch / OPTIMIZER_FILE)
        torch.save(checkpoint.scheduler, scratch / SCHEDULER_FILE)
        torch.save(checkpoint.rng, scratch / RNG_FILE)
        _write_synced(scratch / STATE_FILE, json.dumps({"step": checkpoint.step, **checkpoint.state}))
        _sync(scratch)
        final = self._path(checkpoint.step)
        if final.exists():  # an earlier attempt's copy of the same step
            shutil.rmtree(final)
        os.replace(scratch, final)
        _sync(self.folder)
        self.prune()
        return final

    def prune(self) -> None:
        for step in self.steps()[:-self.keep] if self.keep > 0 else self.steps():
            shutil.rmtree(self._path(step), ignore_errors=True)

    def remove(self) -> None:
        """Delete the job's folder (its run succeeded and the checkpoints are not wanted)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, step: int) -> Path:
        return self.folder / f"{PREFIX}{step}"

    def _read(self, step: int) -> Checkpoint:
        path = self._path(step)
        state = json.loads((path / STATE_FILE).read_text())
        return Checkpoint(step=int(state.pop("step")), weights=load_file(str(path / WEIGHTS_FILE)),
                          optimizer=torch.load(path / OPTIMIZER_FILE, weights_only=True),
                          scheduler=torch.load(path / SCHEDULER_FILE, weights_only=True),
                          rng=torch.load(path / RNG_FILE, weights_only=True), state=state)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def _sync(folder: Path) -> None:
    """fsync a folder's entries (its files' names), where the platform allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
