"""Loads through modelq against the same loads in-process, run pair by pair.

Each run takes a fresh variant of the ~250M model (a new folder of hard links:
no cache holds it, the page cache does), loads it through `Client` on a worker
that is already up, and loads it with `from_pretrained` in a warm process right
after. The same runs give the adapter figures, the worker's peak memory, the
footprint estimates, and the nf4 loads that a second fresh worker later reloads
from the artifact cache.

The adapter figure compares an attach job on the resident base with what a user
pays without it. `attach="nf4"` (the CPU bench): the attach to the resident nf4
base against nf4 base + adapter from scratch in process (a QLoRA user's
from_pretrained with bitsandbytes, then PeftModel.from_pretrained). `attach="bf16"`
(bench/gpu.py): the attach to the resident bf16 base against a bf16 load job that
carries the adapter.

cold_load_ratio_large is the bf16 pair itself: the load job's round trip over the same
from_pretrained in process, on a model of at least LARGE_BYTES, so that the fixed costs
(the queue, the record, the events) are a small share and the figure holds from run to run.
It replaced cold_load_overhead_ratio, (job - in process) / a raw Celery no-op: a
difference of two noisy times over a few milliseconds, which ranged from -3.2 to 13.2 in
one run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench import rss
from bench.env import ROOT, WORKER_ENV, Bench, variant, variant_lora
from bench.figures import Report, percentile
from bench.inprocess import InProcess
from schemas import (
    TERMINAL,
    AdapterSpec,
    AttachAdapterJob,
    JobRecord,
    JobStatus,
    LoadJob,
    ModelRef,
    QuantizationSpec,
    UnloadJob,
)
from schemas.specs import DType
from tests.support.workers import WorkerProcess

log = logging.getLogger(__name__)

NF4 = QuantizationSpec(method="nf4")
LARGE_BYTES = 200 * 10**6
"""The least weight bytes of a model whose cold loads give cold_load_ratio_large."""
Attach = Literal["nf4", "bf16"]


@dataclass
class Samples:
    """Raw measurements of the load runs, in seconds and bytes."""

    cold_bf16: list[float] = field(default_factory=list)
    inproc_bf16: list[float] = field(default_factory=list)
    cold_nf4: list[float] = field(default_factory=list)
    inproc_nf4: list[float] = field(default_factory=list)
    attach: list[float] = field(default_factory=list)
    scratch_with_adapter: list[float] = field(default_factory=list)
    inproc_scratch_with_adapter: list[float] = field(default_factory=list)  # from_pretrained + PeftModel
    inproc_second_adapter: list[float] = field(default_factory=list)  # load_adapter beside the first
    artifact_nf4: list[float] = field(default_factory=list)
    peak_ratio: list[float] = field(default_factory=list)
    estimate_errors: list[float] = field(default_factory=list)
    worker_load_seconds: dict[str, list[float]] = field(default_factory=dict)
    breakdown: dict[str, float] = field(default_factory=dict)
    attach_breakdown: dict[str, float] = field(default_factory=dict)
    nf4_variants: list[Path] = field(default_factory=list)


class LoadRuns:
    """Runs the paired loads on one worker (`worker`) and one in-process baseline."""

    def __init__(self, bench: Bench, worker: WorkerProcess, base: Path, lora: Path,
                 inproc: InProcess, device: str = "cpu", attach: Attach = "bf16") -> None:
        self.bench = bench
        self.attach = attach
        self.device = device
        self.worker = worker
        self.base = base
        self.lora = lora
        self.inproc = inproc
        self.samples = Samples()

    def submit(self, job: Any, timeout: float = 600) -> tuple[float, JobRecord]:
        """Round trip of one job: submit to the terminal record seen by the client."""
        started = time.perf_counter()
        handle = self.bench.client.submit(job)
        record = handle.wait(timeout=timeout)
        elapsed = time.perf_counter() - started
        if record.status is not JobStatus.succeeded or record.result is None:
            raise RuntimeError(f"{job.kind} job {handle.job_id} ended {record.status.value}: "
                               f"{record.error}")
        if record.result.load_seconds is not None:
            if job.kind != "unload":
                self.samples.worker_load_seconds.setdefault(job.kind, []).append(
                    record.result.load_seconds)
        return elapsed, record

    def warm(self) -> None:
        """One unmeasured bf16 and nf4 load each way, and one attach: imports, lazy inits and
        the page cache (the in-process side loads with the adapter where the attach is timed)."""
        for quant in ("none", "nf4"):
            folder = variant(self.base, f"warm-{quant}")
            with_adapter = quant == self._attach_quant
            if with_adapter:  # peft's imports and first wrap, in process too
                self.inproc.adapter(folder, variant_lora(self.lora, folder), self.device, quant)
            else:
                self.inproc.load(self.base, quant, self.device)
            job = LoadJob(model=ModelRef(path=str(folder)), dtype=DType.bfloat16,
                          quantization=NF4 if quant == "nf4" else QuantizationSpec())
            _, record = self.submit(job)
            if with_adapter:
                assert record.result is not None
                self.wait_resident(record.result.model_key)
                self.submit(AttachAdapterJob(model_key=record.result.model_key, name="bench",
                                             adapter=ModelRef(path=str(variant_lora(self.lora, folder)))))
            self.unload(record)

    @property
    def _attach_quant(self) -> str:
        return "nf4" if self.attach == "nf4" else "none"

    def run(self, index: int) -> None:
        s = self.samples
        plain = variant(self.base, f"{index}-a")
        # bf16 cold load, with the worker's peak memory over it
        before = rss.reset_peak(self.worker.pid)
        seconds, loaded = self.submit(LoadJob(model=ModelRef(path=str(plain)), dtype=DType.bfloat16))
        after = rss.read(self.worker.pid)
        assert loaded.result is not None
        s.cold_bf16.append(seconds)
        s.peak_ratio.append((after.peak - before.rss) / loaded.result.footprint_bytes)
        s.inproc_bf16.append(self.inproc.load(plain, "none", self.device))
        if index == 0:
            s.breakdown = stage_breakdown(self.bench, loaded, seconds)
        errors = [self._estimate(loaded)]
        if self.attach == "bf16":
            errors.append(self._attach_bf16(index, plain, loaded))
        else:
            self.unload(loaded)
        # nf4 cold load (quantize on load); its variant is reloaded later by a fresh worker
        seconds, quantized = self.submit(LoadJob(model=ModelRef(path=str(plain)), dtype=DType.bfloat16,
                                                 quantization=NF4))
        s.cold_nf4.append(seconds)
        if self.attach == "nf4":  # the in-process nf4 load is the QLoRA user's, adapter and all
            s.inproc_nf4.append(self._attach_nf4(index, plain, quantized))
        else:
            s.inproc_nf4.append(self.inproc.load(plain, "nf4", self.device))
        s.nf4_variants.append(plain)
        errors.append(self._estimate(quantized))
        self.unload(quantized)
        known = [e for e in errors if e is not None]
        if known:
            s.estimate_errors.append(max(known))  # the worst of this run's loads

    def _attach_bf16(self, index: int, plain: Path, loaded: JobRecord) -> float | None:
        """Attach to the resident bf16 base, against a bf16 load job carrying the adapter."""
        s = self.samples
        assert loaded.result is not None
        self.wait_resident(loaded.result.model_key)
        seconds, attached = self.submit(AttachAdapterJob(
            model_key=loaded.result.model_key, adapter=ModelRef(path=str(variant_lora(self.lora, plain))),
            name="bench"))
        s.attach.append(seconds)
        scratch = variant(self.base, f"{index}-b")
        scratch_lora = variant_lora(self.lora, scratch)
        seconds, with_adapter = self.submit(LoadJob(
            model=ModelRef(path=str(scratch)), dtype=DType.bfloat16,
            adapters=(AdapterSpec(ref=ModelRef(path=str(scratch_lora))),)))
        s.scratch_with_adapter.append(seconds)
        times = self.inproc.adapter(scratch, scratch_lora, self.device)
        s.inproc_scratch_with_adapter.append(times.scratch)
        s.inproc_second_adapter.append(times.second)
        self.unload(attached)
        self.unload(with_adapter)
        return self._estimate(with_adapter)

    def _attach_nf4(self, index: int, plain: Path, quantized: JobRecord) -> float:
        """Attach to the resident nf4 base, against nf4 base + adapter from scratch in process;
        the seconds of that in-process from_pretrained (the nf4 load alone)."""
        s = self.samples
        assert quantized.result is not None
        adapter = variant_lora(self.lora, plain)
        self.wait_resident(quantized.result.model_key)
        seconds, attached = self.submit(AttachAdapterJob(
            model_key=quantized.result.model_key, adapter=ModelRef(path=str(adapter)), name="bench"))
        s.attach.append(seconds)
        if index == 0:
            s.attach_breakdown = stage_breakdown(self.bench, attached, seconds)
        times = self.inproc.adapter(plain, adapter, self.device, "nf4")
        s.inproc_scratch_with_adapter.append(times.scratch)
        s.inproc_second_adapter.append(times.second)
        return times.base

    def reload_nf4(self, folder: Path) -> None:
        """A fresh worker's nf4 load of a variant another worker already quantized."""
        seconds, record = self.submit(LoadJob(model=ModelRef(path=str(folder)), dtype=DType.bfloat16,
                                              quantization=NF4))
        self.samples.artifact_nf4.append(seconds)
        self.unload(record)

    def unload(self, record: JobRecord) -> None:
        assert record.result is not None
        self.wait_resident(record.result.model_key)
        self.submit(UnloadJob(model_key=record.result.model_key))

    def wait_resident(self, model_key: str, timeout: float = 10) -> None:
        """Until the registry lists `model_key`: the worker republishes it just after the record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.bench.client.registry.holder(model_key) is not None:
                return
            time.sleep(0.01)
        raise TimeoutError(f"model {model_key} never showed up in the registry")

    def warm_fresh(self) -> None:
        """A new worker's first nf4 load, unmeasured (it reloads the warm-up variant)."""
        _, record = self.submit(LoadJob(model=ModelRef(path=str(variant(self.base, "warm-nf4"))),
                                        dtype=DType.bfloat16, quantization=NF4))
        self.unload(record)

    def _estimate(self, record: JobRecord) -> float | None:
        """Relative error of the record's footprint estimate; None when it has none."""
        result = record.result
        estimated = getattr(result, "estimated_bytes", None)
        if result is None or not estimated:
            return None
        return abs(estimated - result.footprint_bytes) / result.footprint_bytes


def stage_breakdown(bench: Bench, record: JobRecord, round_trip: float) -> dict[str, float]:
    """Where a cold load's round trip went, from its event timestamps (seconds)."""
    events = [event for _, event in bench.client.store.events(record.job_id, count=10_000)]
    marks: list[tuple[str, float]] = []
    for event in events:
        terminal = event.status in TERMINAL or event.stage is None
        label = event.status.value if terminal else event.stage.value  # type: ignore[union-attr]
        if not marks or marks[-1][0] != label:
            marks.append((label, event.at.timestamp()))
    out: dict[str, float] = {}
    for (label, at), (_, next_at) in zip(marks, marks[1:], strict=False):
        out[f"{label}_s"] = round(next_at - at, 4)
    out["events"] = float(len(events))
    out["round_trip_s"] = round(round_trip, 4)
    out["worker_load_seconds"] = float(record.result.load_seconds or 0) if record.result else 0.0
    return out


def load_phase(bench: Bench, report: Report, worker: WorkerProcess, base: Path, lora: Path,
               runs: int, device: str = "cpu", env: dict[str, str] | None = None,
               fresh_args: tuple[str, ...] = (), attach: Attach = "bf16") -> LoadRuns:
    """The paired load runs on `worker` (the only one up), then the artifact reloads.

    Fills cold_load_ratio_* (cold_load_ratio_large noting the model's size),
    adapter_attach_speedup (and its in-process ceiling, adapter_attach_ceiling),
    peak_rss_ratio, estimate_max_error and artifact_cache_speedup in `report`
    (whichever of them it has).
    """
    inproc = InProcess(ROOT, env=env or WORKER_ENV, log=bench.run_dir / "inprocess.log")
    try:
        loads = LoadRuns(bench, worker, base, lora, inproc, device, attach)
        log.info("loads: warming the worker and the in-process baseline")
        loads.warm()
        for index in range(runs):
            log.info("loads: run %d of %d", index + 1, runs)
            loads.run(index)
    finally:
        inproc.close()
    s = loads.samples
    _add(report, "cold_load_ratio_bf16", ratios(s.cold_bf16, s.inproc_bf16))
    _add(report, "cold_load_ratio_nf4", ratios(s.cold_nf4, s.inproc_nf4))
    _add_large(report, base, s)
    scratch = s.scratch_with_adapter if attach == "bf16" else s.inproc_scratch_with_adapter
    _add(report, "adapter_attach_speedup", ratios(scratch, s.attach))
    _add(report, "adapter_attach_ceiling",  # no queue: the best adapter_attach_speedup could be here
         ratios(s.inproc_scratch_with_adapter, s.inproc_second_adapter))
    _add(report, "peak_rss_ratio", s.peak_ratio)
    _add(report, "estimate_max_error", s.estimate_errors,  # each run's worst error
         "records carry no estimated_bytes (no footprint estimate on this branch)")
    artifacts = bench.artifact_dir
    if artifacts.is_dir() and any(artifacts.iterdir()):
        worker.terminate()
        log.info("artifacts: a fresh worker reloads the nf4 variants")
        loads.worker = bench.pool.start("fresh", *fresh_args, timeout=300)
        loads.warm_fresh()
        for folder in s.nf4_variants:
            loads.reload_nf4(folder)
        _add(report, "artifact_cache_speedup", ratios(s.cold_nf4, s.artifact_nf4))
    else:
        _add(report, "artifact_cache_speedup", [],
             "nothing written under MODELQ_ARTIFACT_DIR by an nf4 load: no artifact cache here")
    report.context["loads"] = {k: v for k, v in vars(s).items() if k != "nf4_variants"}
    return loads


def _add_large(report: Report, base: Path, s: Samples) -> None:
    """cold_load_ratio_large: the bf16 pairs, with the model's size and both sides' medians."""
    weights = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    _add(report, "cold_load_ratio_large", ratios(s.cold_bf16, s.inproc_bf16))
    try:
        figure = report.figure("cold_load_ratio_large")
    except KeyError:
        return
    if s.cold_bf16:
        figure.note = (f"{weights / 1e6:.0f} MB of bf16 weights: {percentile(s.cold_bf16, 50):.2f} s "
                       f"through modelq / {percentile(s.inproc_bf16, 50):.2f} s from_pretrained in process")
    if weights < LARGE_BYTES:
        figure.note = (figure.note or "") + f" (under {LARGE_BYTES // 10**6} MB: fixed costs weigh more)"


def ratios(top: list[float], bottom: list[float]) -> list[float]:
    """Pairwise top / bottom of two sample lists taken run by run (of equal length)."""
    return [a / b for a, b in zip(top, bottom, strict=True)]


def _add(report: Report, key: str, values: list[float], absent: str = "") -> None:
    try:
        figure = report.figure(key)
    except KeyError:
        return
    figure.add(*values)
    if not values and absent:
        figure.note = absent
