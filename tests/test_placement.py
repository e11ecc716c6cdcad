"""worker/models/placement.py: a device_map strategy resolved to the map from_pretrained makes of it,
so budgets that place a model alike share a key and budgets that split it do not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from schemas import InvalidJob, LoadJob
from tests.support.models import build_remote_code_model
from worker.jobs.progress import Reporter
from worker.models import loader
from worker.models.placement import Placements, strategy_map
from worker.models.resolve import Resolved, Source, fingerprint, resolve


def _job(path: Path, placement: dict[str, Any], **extra: Any) -> LoadJob:
    return LoadJob.model_validate({"model": str(path), "placement": placement, **extra})


def _split_budget(path: Path) -> int:
    """A cpu budget of 70% of the weights: the embedding fits, the decoder layers do not."""
    return int(sum(f.stat().st_size for f in path.glob("*.safetensors")) * 0.7)


def test_generous_budgets_resolve_to_one_map_and_one_key(models: dict[str, Path]) -> None:
    path = models["llama"]
    resolved = resolve(LoadJob(model=str(path)).model)
    placements = Placements()
    jobs = [_job(path, {"device_map": strategy, "max_memory": {"cpu": budget}})
            for strategy in ("auto", "balanced", "sequential") for budget in ("20GiB", "30GiB")]
    maps = [strategy_map(resolved, job, "cpu") for job in jobs]
    assert all(m == {"": "cpu"} for m in maps), maps
    keys = {loader.model_key("path:/m#f1", placements.concrete(resolved, job, "cpu"), "cpu")
            for job in jobs}
    plain = loader.model_key("path:/m#f1", LoadJob(model=str(path)), "cpu")
    assert keys == {plain}  # every module on the cpu is where a plain load puts it


def test_a_budget_that_splits_the_model_gives_another_map_and_key(models: dict[str, Path]) -> None:
    path = models["llama"]
    resolved = resolve(LoadJob(model=str(path)).model)
    tight = _job(path, {"device_map": "auto", "max_memory": {"cpu": _split_budget(path)}})
    mapping = strategy_map(resolved, tight, "cpu")
    assert set(mapping.values()) == {"cpu", "disk"}, mapping
    assert mapping["model.embed_tokens"] == "cpu"
    placements = Placements()
    generous = _job(path, {"device_map": "auto", "max_memory": {"cpu": "20GiB"}})
    assert (loader.model_key("path:/m#f1", placements.concrete(resolved, tight, "cpu"), "cpu")
            != loader.model_key("path:/m#f1", placements.concrete(resolved, generous, "cpu"), "cpu"))


def test_the_resolved_map_is_the_one_from_pretrained_makes(models: dict[str, Path]) -> None:
    path = models["llama"]
    resolved = resolve(LoadJob(model=str(path)).model)
    reporter = Reporter(lambda *_: None, lambda: False)
    tight = _job(path, {"device_map": "auto", "max_memory": {"cpu": _split_budget(path)}})
    by_transformers = loader.load(resolved, tight, "cpu", reporter).hf_device_map
    concrete = Placements().concrete(resolved, tight, "cpu")
    assert concrete.placement.device_map == by_transformers
    assert loader.load(resolved, concrete, "cpu", reporter).hf_device_map == by_transformers


def test_sharded_and_quantized_models_resolve(models: dict[str, Path]) -> None:
    sharded = models["mistral"]
    resolved = resolve(LoadJob(model=str(sharded)).model)
    assert strategy_map(resolved, _job(sharded, {"device_map": "auto"}), "cpu") == {"": "cpu"}
    path = models["llama"]
    resolved = resolve(LoadJob(model=str(path)).model)
    for method in ("int8", "nf4"):
        job = _job(path, {"device_map": "auto", "max_memory": {"cpu": "1GiB"}}, quantization=method)
        assert strategy_map(resolved, job, "cpu") == {"": "cpu"}


def test_other_placements_pass_through_and_a_request_resolves_once(models: dict[str, Path]) -> None:
    path = models["llama"]
    resolved = resolve(LoadJob(model=str(path)).model)
    placements = Placements(size=2)
    for placement in ({}, {"device_map": "cpu", "max_memory": {"cpu": "1GiB"}}, {"device_map": {"": "cpu"}}):
        job = _job(path, placement)
        assert placements.concrete(resolved, job, "cpu") is job
    jobs = [_job(path, {"device_map": "auto", "max_memory": {"cpu": f"{n}GiB"}}) for n in (1, 2, 3)]
    first = placements.concrete(resolved, jobs[0], "cpu").placement
    assert placements.concrete(resolved, jobs[0], "cpu").placement is first  # remembered
    for job in jobs[1:]:
        placements.concrete(resolved, job, "cpu")
    assert placements.concrete(resolved, jobs[0], "cpu").placement is not first  # forgotten: bounded


def test_a_remote_code_model_is_left_to_transformers_and_its_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    path = build_remote_code_model(tmp_path / "custom", marker)
    job = _job(path, {"device_map": "auto", "max_memory": {"cpu": "1GiB"}})
    source = Source(ref=str(path), path=path, fingerprint=fingerprint(path))
    assert Placements().concrete(Resolved(base=source, config={}), job, "cpu") is job
    assert not marker.exists()


def test_budgets_for_devices_the_worker_lacks_are_invalid(models: dict[str, Path]) -> None:
    path = models["llama"]
    resolved = resolve(LoadJob(model=str(path)).model)
    job = _job(path, {"device_map": "auto", "max_memory": {"cuda:0": "1GiB"}})
    with pytest.raises(InvalidJob):
        Placements().concrete(resolved, job, "cpu")
