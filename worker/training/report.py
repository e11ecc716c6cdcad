"""TensorBoard event files for a training run, written only when a job asks (`report_to`).

`tensorboard` (through torch's SummaryWriter) is imported here on first use, never at the
worker's start: a worker without it fails only the jobs that ask for it, with a message
that says what to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from schemas.errors import InvalidJob


class TensorBoard:
    """Scalars per step (`train/loss`, `train/learning_rate`, ...) under `folder`."""

    def __init__(self, folder: Path, first_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise InvalidJob(f"report_to='tensorboard' needs the tensorboard package on the worker "
                             f"({exc}): pip install tensorboard, or leave report_to out") from None
        folder.mkdir(parents=True, exist_ok=True)
        # a resumed run drops what an earlier attempt wrote past its checkpoint
        self._writer: Any = SummaryWriter(log_dir=str(folder), purge_step=first_step)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            group = "eval" if name.startswith("eval_") else "train"
            self._writer.add_scalar(f"{group}/{name.removeprefix('eval_')}", value, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
