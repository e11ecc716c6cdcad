"""`modelq eval` end to end: a real Redis, two real `modelq worker` processes, lm-eval in process.

On a local multiple-choice task (tests/data/harness: a task YAML and its JSON-lines data, no
network), `modelq eval REF` prints the accuracy `lm_eval --model hf` gives on the same model
folder, each choice's log-likelihood within 1e-4 of HFLM's, and its jobs ran on both workers;
`modelq eval --model-key KEY` on the model they now hold prints the same accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tasks.cli.main import main
from tasks.client import Client
from tasks.settings import Settings
from tests.support.models import build_bpe_model
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e
lm_eval = pytest.importorskip("lm_eval")

DATA = Path(__file__).resolve().parent / "data" / "harness"
TASK = "modelq_toy_mc"


def test_modelq_eval_scores_as_lm_eval_hf_does_over_the_whole_pool(
        pool: WorkerPool, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.tasks import TaskManager

    folder = build_bpe_model(tmp_path / "bpe", add_bos=False, seed=5)
    pool.start("eval-a")
    pool.start("eval-b")
    monkeypatch.chdir(DATA)  # the task's data_files path is relative
    out = tmp_path / "out"
    ran = CliRunner().invoke(main, ["eval", str(folder), "--dtype", "float32", "--tasks", TASK,
                                    "--include-path", str(DATA), "--batch-size", "8",
                                    "--output-path", str(out), "--json"],
                             env={"MODELQ_REDIS_URL": settings.redis_url})
    assert ran.exit_code == 0, ran.output
    got = json.loads(ran.stdout)["results"][TASK]

    expected = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},dtype=float32", device="cpu", tasks=[TASK],
        task_manager=TaskManager(include_path=str(DATA), include_defaults=False))
    reference = expected["results"][TASK]
    for metric in ("acc,none", "acc_norm,none"):
        assert got[metric] == reference[metric], metric

    ours = {row["doc_id"]: row["resps"] for row in map(json.loads, (out / f"samples_{TASK}.jsonl").open())}
    theirs = {row["doc_id"]: row["resps"] for row in expected["samples"][TASK]}
    assert sorted(ours) == sorted(theirs) == list(range(24))
    for doc, responses in theirs.items():
        assert [r[0][0] for r in ours[doc]] == pytest.approx([r[0][0] for r in responses], abs=1e-4)
        assert [bool(r[0][1]) for r in ours[doc]] == [bool(r[0][1]) for r in responses]

    holders = sorted(w.name for w in Client(settings).workers() if w.models)
    assert holders == ["eval-a", "eval-b"]  # the chunks were spread over both workers
    keys = {m.model_key for w in Client(settings).workers() for m in w.models}
    assert len(keys) == 1  # one model, named by the same key on both workers
    by_key = CliRunner().invoke(main, ["eval", "--model-key", keys.pop(), "--tasks", TASK,
                                       "--include-path", str(DATA), "--batch-size", "8", "--json"],
                                env={"MODELQ_REDIS_URL": settings.redis_url})
    assert by_key.exit_code == 0, by_key.output
    resident = json.loads(by_key.stdout)["results"][TASK]
    assert {m: resident[m] for m in ("acc,none", "acc_norm,none")} == {
        m: reference[m] for m in ("acc,none", "acc_norm,none")}
