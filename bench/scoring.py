"""`python -m bench.scoring [--quick] [--json PATH]`: batched scoring and `modelq eval`, side by side.

* loglikelihood_batch_speedup: one `modelq.loglikelihood` job of 256 [context, continuation]
  pairs on a resident model, `batch_size=1` ÷ the default (batched), job round trips,
  alternated; target >= 3.
* eval_ratio: `modelq eval` (lm-eval's `simple_evaluate` with the `modelq` model, in this
  process, its jobs on one worker) ÷ `lm_eval --model hf` (in process, its default batch
  size of 1) on the same model folder and a local multiple-choice task of 100 questions;
  target <= 1.3. `eval_ratio_hf_batched` is the same against `--model hf` with
  batch_size=32, for context.

The model is a llama of 19.2M float32 parameters (hidden 512, 8 layers, a byte-level BPE
tokenizer of 320 ids, 128 positions), large enough that a forward pass is not Python
overhead; the worker and this process both run torch on one thread. On a CPU thread such a
forward pass is compute-bound, and batching saves little (one quick run on a shared 2-core
machine: loglikelihood_batch_speedup 1.03, eval_ratio 0.65); the 3x target is a GPU's, where a
single row's forward pass is launch overhead.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from bench.env import CACHE, Bench
from bench.figures import Figure, Report
from schemas import JobStatus, LoadJob, ModelRef, RunResult
from tests.support.models import TOKENIZER_LINES, build_bpe_model

log = logging.getLogger("bench.scoring")

SIZES = {"hidden": 512, "layers": 8, "vocab": 320}
PAIRS = 256
TASK = "bench_scoring_mc"
QUESTIONS = 100


def scoring_model(cache: Path = CACHE) -> Path:
    folder = cache / "models" / "llama-scoring-bpe"
    if not (folder / "tokenizer.json").is_file():
        build_bpe_model(folder, add_bos=True, seed=3, **SIZES)  # type: ignore[arg-type]
    return folder


def pairs(count: int = PAIRS, seed: int = 0) -> list[list[str]]:
    """[context, continuation] pairs of 20-90 tokens in all, contexts of varied length."""
    rng = random.Random(seed)
    words = " ".join(TOKENIZER_LINES).split()
    out = []
    for _ in range(count):
        context = " ".join(rng.choices(words, k=rng.randint(4, 24)))
        out.append([context, " " + " ".join(rng.choices(words, k=rng.randint(1, 4)))])
    return out


def task_folder(root: Path, seed: int = 1) -> Path:
    """A multiple-choice task YAML and its JSON-lines data (absolute path) under `root`."""
    rng = random.Random(seed)
    words = " ".join(TOKENIZER_LINES).split()
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data.json"
    with open(data, "w") as out:
        for _ in range(QUESTIONS):
            out.write(json.dumps({"question": " ".join(rng.choices(words, k=rng.randint(6, 20))),
                                  "choices": [" ".join(rng.choices(words, k=rng.randint(1, 3)))
                                              for _ in range(4)],
                                  "answer": rng.randrange(4)}) + "\n")
    (root / "task.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    return root


def _job_seconds(bench: Bench, key: str, requests: list[list[str]], **kwargs: Any) -> float:
    started = time.perf_counter()
    record = bench.client.run("modelq.loglikelihood", model=key, args=[requests], kwargs=kwargs).wait(600)
    if record.status is not JobStatus.succeeded or not isinstance(record.result, RunResult):
        raise RuntimeError(f"loglikelihood job failed: {record.error}")
    return time.perf_counter() - started


def batch_speedup(bench: Bench, key: str, rounds: int, report: Report) -> None:
    requests = pairs()
    _job_seconds(bench, key, requests[:8])  # warm: the tokenizer
    for _ in range(rounds):
        one = _job_seconds(bench, key, requests, batch_size=1)
        batched = _job_seconds(bench, key, requests)
        log.info("256 pairs: batch_size=1 %.2fs, batched %.2fs", one, batched)
        report.figure("loglikelihood_batch_speedup").add(one / batched)
        report.context.setdefault("loglikelihood_seconds", []).append({"one": one, "batched": batched})


def _evaluate(model: Any, tasks_dir: Path, **kwargs: Any) -> tuple[float, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    results = simple_evaluate(model=model, tasks=[TASK], bootstrap_iters=0,
                              task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                              **kwargs)
    return time.perf_counter() - started, float(results["results"][TASK]["acc,none"])


def eval_ratio(bench: Bench, folder: Path, key: str, rounds: int, report: Report) -> None:
    import torch

    from tasks.harness import ModelqLM

    torch.set_num_threads(1)  # as the worker (bench/env.py WORKER_ENV)
    tasks_dir = task_folder(bench.run_dir / "eval-task")
    ours = ModelqLM(model_key=key, client=bench.client)
    hf_args = f"pretrained={folder},dtype=float32"
    for _ in range(rounds):
        modelq_seconds, modelq_acc = _evaluate(ours, tasks_dir)
        hf_seconds, hf_acc = _evaluate("hf", tasks_dir, model_args=hf_args, device="cpu")
        hf32_seconds, _ = _evaluate("hf", tasks_dir, model_args=hf_args, device="cpu", batch_size=32)
        if modelq_acc != hf_acc:
            raise RuntimeError(f"modelq eval gave acc {modelq_acc}, lm_eval --model hf {hf_acc}")
        log.info("eval: modelq %.2fs, hf %.2fs, hf batch 32 %.2fs (acc %.3f)", modelq_seconds,
                 hf_seconds, hf32_seconds, hf_acc)
        report.figure("eval_ratio").add(modelq_seconds / hf_seconds)
        report.figure("eval_ratio_hf_batched").add(modelq_seconds / hf32_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one round of each (default three)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    rounds = 1 if args.quick else 3
    report = Report([Figure("loglikelihood_batch_speedup", 3, ">="), Figure("eval_ratio", 1.3, "<="),
                     Figure("eval_ratio_hf_batched", None, "<=")])
    folder = scoring_model()
    with Bench() as bench:
        bench.pool.start("scoring")
        record = bench.client.submit(LoadJob(model=ModelRef(path=str(folder)), dtype="float32")).wait(300)
        if record.status is not JobStatus.succeeded or record.result is None:
            raise RuntimeError(f"loading the scoring model failed: {record.error}")
        key = record.result.model_key
        report.context["model"] = {"folder": str(folder), "parameters": record.result.num_parameters}
        batch_speedup(bench, key, rounds, report)
        eval_ratio(bench, folder, key, rounds, report)
    print(report.table())
    if args.json:
        report.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
