"""`modelq eval`: lm-evaluation-harness's `simple_evaluate` on a model of the pool (no torch of ours).

The harness runs in this process and sends its requests to the pool as run jobs through the
`modelq` model (tasks/harness.py); the table printed is the harness's own (`make_table`).
lm-eval is imported only when the command runs: it is the `eval` extra.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from tasks.cli.common import FAILED, INVALID, client_of_command, fail, tenant_option
from tasks.cli.jobs import load_options, load_spec


@click.command(name="eval")
@click.argument("ref", required=False)
@click.option("--model-key", default=None, help="A resident model's key (instead of REF).")
@load_options
@click.option("--adapter", default=None, metavar="NAME", help="Adapter active for every request.")
@click.option("--tasks", "task_names", required=True, metavar="T1,T2",
              help="lm-eval task (or group) names, comma-separated.")
@click.option("--include-path", default=None, type=click.Path(exists=True, file_okay=False),
              help="A folder of task YAMLs (only these tasks are indexed: no built-ins).")
@click.option("--limit", default=None, type=float, help="Examples per task (a fraction if < 1).")
@click.option("--num-fewshot", default=None, type=int, help="Few-shot examples per prompt.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Requests per run job.")
@click.option("--output-path", default=None, type=click.Path(file_okay=False),
              help="Write the harness's results (and samples) JSON under this folder.")
@tenant_option()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of tables.")
def eval_command(ref: str | None, model_key: str | None, adapter: str | None, task_names: str,
                 include_path: str | None, limit: float | None, num_fewshot: int | None,
                 batch_size: int, output_path: str | None, tenant: str, as_json: bool,
                 **flags: Any) -> None:
    """Evaluate a model (a resident one, --model-key KEY, or REF, loaded first) with
    lm-evaluation-harness, its requests spread over the pool."""
    try:
        from lm_eval import simple_evaluate  # type: ignore[import-untyped]
        from lm_eval.tasks import TaskManager  # type: ignore[import-untyped]
        from lm_eval.utils import make_table  # type: ignore[import-untyped]

        from tasks.harness import ModelqLM
    except ImportError as exc:
        fail(f"modelq eval needs lm-evaluation-harness ({exc}): pip install 'modelq[eval]'", INVALID)
    target = _target(ref, model_key, tenant, flags)
    tasks = [t.strip() for t in task_names.split(",") if t.strip()]
    if not tasks:
        fail("--tasks names no task", INVALID)
    model = ModelqLM(model_key=target.get("model_key"), load=target.get("load"), adapter=adapter,
                     batch_size=batch_size, client=client_of_command(), tenant=tenant)
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    try:
        results = simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=output_path is not None)
    except RuntimeError as exc:
        fail(str(exc), FAILED)
    except (KeyError, ValueError) as exc:
        fail(f"lm-eval refused the run: {exc}", INVALID)
    if results is None:
        fail("lm-eval returned no results", FAILED)
    samples = results.pop("samples", None)
    if output_path is not None:
        _write(Path(output_path), results, samples)
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str))
    else:
        click.echo(make_table(results))
        if results.get("groups"):
            click.echo(make_table(results, "groups"))
    sys.exit(0)


def _target(ref: str | None, model_key: str | None, tenant: str, flags: dict[str, Any]) -> dict[str, Any]:
    if (ref is None) == (model_key is None):
        fail("name the model once: --model-key KEY (a resident model) or a REF to load", INVALID)
    if model_key is not None:
        return {"model_key": model_key}
    load = load_spec(str(ref), tenant, flags)
    load.pop("kind")
    return {"load": load}


def _write(folder: Path, results: dict[str, Any], samples: dict[str, Any] | None) -> None:
    """results.json, and samples_<task>.jsonl for each task (the harness's records of each request)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    for task, rows in (samples or {}).items():
        with open(folder / f"samples_{task}.jsonl", "w") as out:
            for row in rows:
                out.write(json.dumps(row, default=str) + "\n")


COMMANDS = [eval_command]
