"""Quantize once: quantized weights saved as safetensors on local disk, reused by any worker of the host.

An artifact is a folder under the artifact root named by a hash of (base identity,
dtype, quantization spec): the base identity is the hub commit or the local
folder's fingerprint, so a changed base gets a new name and its old artifact is
never read again (and is pruned when the new one is written). A folder is written
under a temporary name and renamed into place, so a crash never leaves half an
artifact where a reader would take it for a whole one.

This module does not decide when to load; the load handler (worker/handlers/load.py) asks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from schemas import LoadJob

log = logging.getLogger(__name__)

MARKER = "modelq-artifact.json"  # written last inside the temp folder: what the artifact is


class Artifacts:
    """The artifact folders under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root  # Settings.artifact_dir, else `home`/artifacts (worker/app.py)

    @staticmethod
    def eligible(job: LoadJob) -> bool:
        """Only quantized loads whose whole model goes to one device are saved."""
        return job.quantization.quantized and not isinstance(job.placement.device_map, dict) and \
            job.placement.device_map in (None, "cpu", "cuda", "cuda:0", "0") and not job.trust_remote_code

    def folder(self, identity: str, job: LoadJob) -> Path:
        return self.root / f"{_base_tag(identity)}-{_spec_tag(job)}"

    def find(self, identity: str, job: LoadJob) -> Path | None:
        """The complete artifact for (base, spec), if one was saved on this host."""
        folder = self.folder(identity, job)
        marker = folder / MARKER
        if not marker.is_file():
            return None
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        return folder if meta.get("identity") == identity else None

    def save(self, model: torch.nn.Module, identity: str, job: LoadJob) -> Path | None:
        """Save `model` (freshly quantized, no adapters) atomically; None when saving failed."""
        target = self.folder(identity, job)
        if target.is_dir():
            return target
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=self.root))
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)  # type: ignore[operator]
            (tmp / MARKER).write_text(json.dumps({
                "identity": identity, "quantization": job.quantization.model_dump(mode="json"),
                "dtype": job.dtype.value}))
            os.rename(tmp, target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if target.is_dir():  # another worker of this host won the race
                return target
            log.warning("could not save the quantized artifact %s: %s", target, exc)
            return None
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            log.exception("could not save the quantized artifact %s", target)
            return None
        self._prune(identity, target)
        log.info("saved quantized artifact %s", target)
        return target

    def _prune(self, identity: str, keep: Path) -> None:
        """Remove artifacts of the same base ref at another revision (they can't be used again)."""
        ref = identity.rsplit("@", 1)[0].rsplit("#", 1)[0]
        for folder in self.root.iterdir():
            if folder == keep or folder.name.startswith(".") or not (folder / MARKER).is_file():
                continue
            try:
                other = json.loads((folder / MARKER).read_text()).get("identity", "")
            except (OSError, ValueError):
                continue
            if other != identity and other.rsplit("@", 1)[0].rsplit("#", 1)[0] == ref:
                shutil.rmtree(folder, ignore_errors=True)


def _base_tag(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _spec_tag(job: LoadJob) -> str:
    spec = {"dtype": job.dtype.value, "quantization": job.quantization.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
