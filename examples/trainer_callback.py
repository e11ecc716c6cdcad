"""A training platform's hook: each checkpoint a `transformers.Trainer` saves is served and scored.

On every save, `ModelqCheckpointCallback` attaches the checkpoint's adapter folder to a
base model resident in a modelq pool (under the name ``<prefix>-<step>``, not
activated: whoever else uses the base keeps its adapters) and runs
`modelq.loglikelihood` of a fixed list of eval texts with that adapter alone active.

With `harness_tasks`, each checkpoint is also evaluated with lm-evaluation-harness through
the pool (tasks/harness.py's `modelq` model, the `eval` extra; `include_path` for local task
YAMLs): the harness's results per task land in `checkpoint.harness`, as `modelq eval
--model-key KEY --adapter NAME` would print them.

Training never waits on modelq: `on_save` only puts the checkpoint on a local queue.
One background thread submits the attach, waits for it (the evaluation names the
adapter, so it must be attached first, whichever worker holds the base), then submits
the evaluation and moves on; it does not wait for the evaluation. Each checkpoint's
job ids are in `callback.checkpoints`; read the results with ``client.job(id).wait()``.
Errors (Redis down, an attach refused) are recorded on the checkpoint, never raised
into training.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from schemas import AttachAdapterJob, JobStatus, ModelqError, ModelRef
from tasks.client import Client

log = logging.getLogger(__name__)


@dataclass
class CheckpointJobs:
    """One saved checkpoint and the modelq jobs submitted for it (ids None until submitted)."""

    step: int
    folder: Path
    adapter: str
    attach_job_id: str | None = None
    eval_job_id: str | None = None
    error: str | None = None  # why the chain stopped: the attach failed, Redis was unreachable
    harness: dict[str, Any] | None = None  # lm-eval's results by task, with `harness_tasks`


class ModelqCheckpointCallback(TrainerCallback):
    """Attach each saved checkpoint's adapter to the resident base `model_key` and score `eval_texts`."""

    def __init__(self, client: Client, model_key: str, eval_texts: Sequence[str], *,
                 prefix: str = "ckpt", attach_timeout: float = 600.0,
                 harness_tasks: Sequence[str] = (), include_path: str | None = None) -> None:
        self.client = client
        self.model_key = model_key
        self.eval_texts = list(eval_texts)
        self.prefix = prefix
        self.attach_timeout = attach_timeout
        self.harness_tasks = list(harness_tasks)
        self.include_path = include_path
        self.checkpoints: list[CheckpointJobs] = []
        self._pending: queue.Queue[CheckpointJobs] = queue.Queue()
        self._thread: threading.Thread | None = None

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Queue the checkpoint the Trainer has just written; returns at once."""
        if not state.is_world_process_zero:  # one submitter per training run
            return
        folder = Path(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}").resolve()
        checkpoint = CheckpointJobs(state.global_step, folder, f"{self.prefix}-{state.global_step}")
        self.checkpoints.append(checkpoint)
        if self._thread is None:
            self._thread = threading.Thread(target=self._submit_forever, name="modelq-checkpoints",
                                            daemon=True)
            self._thread.start()
        self._pending.put(checkpoint)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued checkpoint's jobs are submitted (not finished); False on timeout.

        For the end of a script or a test; training itself never calls it.
        """
        if self._thread is None:
            return True
        done = threading.Event()
        threading.Thread(target=self._join, args=(done,), daemon=True).start()
        return done.wait(timeout)

    def _join(self, done: threading.Event) -> None:
        self._pending.join()
        done.set()

    def _submit_forever(self) -> None:
        while True:
            checkpoint = self._pending.get()
            try:
                self._submit(checkpoint)
            except (ModelqError, OSError, RuntimeError, ValueError) as exc:  # Redis down, lm-eval refused
                checkpoint.error = f"{type(exc).__name__}: {exc}"
                log.warning("checkpoint %s: %s", checkpoint.step, checkpoint.error)
            finally:
                self._pending.task_done()

    def _submit(self, checkpoint: CheckpointJobs) -> None:
        attach = self.client.submit(AttachAdapterJob(
            model_key=self.model_key, adapter=ModelRef(path=str(checkpoint.folder)),
            name=checkpoint.adapter, activate=False))
        checkpoint.attach_job_id = attach.job_id
        record = attach.wait(timeout=self.attach_timeout)
        if record.status is not JobStatus.succeeded:
            reason = record.error.message if record.error is not None else record.status.value
            checkpoint.error = f"attach {attach.job_id} {record.status.value}: {reason}"
            log.warning("checkpoint %s: %s", checkpoint.step, checkpoint.error)
            return
        evaluation = self.client.run("modelq.loglikelihood", model=self.model_key,
                                     adapters=[checkpoint.adapter], args=[self.eval_texts])
        checkpoint.eval_job_id = evaluation.job_id
        if self.harness_tasks:
            checkpoint.harness = self._harness(checkpoint.adapter)

    def _harness(self, adapter: str) -> dict[str, Any]:
        """lm-eval's results for `harness_tasks` on the base with `adapter`, over the pool
        (this thread waits for them; training does not)."""
        from lm_eval import simple_evaluate  # type: ignore[import-untyped]
        from lm_eval.tasks import TaskManager  # type: ignore[import-untyped]

        from tasks.harness import ModelqLM

        model = ModelqLM(model_key=self.model_key, adapter=adapter, client=self.client)
        manager = None if self.include_path is None else TaskManager(
            include_path=self.include_path, include_defaults=False)
        results = simple_evaluate(model=model, tasks=self.harness_tasks, task_manager=manager)
        if results is None:
            raise RuntimeError("lm-eval returned no results")
        return dict(results["results"])


if __name__ == "__main__":
    # Usage sketch: python examples/trainer_callback.py MODEL_KEY
    # (MODEL_KEY: the base, loaded in the pool beforehand, e.g. `modelq load ./base --quant nf4 --wait`.)
    import sys

    from transformers import Trainer

    client = Client()  # MODELQ_* settings, or the running `modelq up`
    callback = ModelqCheckpointCallback(client, sys.argv[1], ["held-out text one", "held-out text two"])
    trainer: Trainer | None = None  # your Trainer(model=peft_model, args=..., callbacks=[callback])
    if trainer is not None:
        trainer.train()
    callback.wait(timeout=60)
    for saved in callback.checkpoints:
        scores = None if saved.eval_job_id is None else client.job(saved.eval_job_id).wait(timeout=600)
        print(saved.step, saved.adapter, saved.error or (scores.result if scores else None))
