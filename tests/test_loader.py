"""worker/models/loader.py: the BitsAndBytesConfig a spec becomes, placement arguments, model
keys, the device-map summary, and what a loaded model is reported as."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt

from schemas import InvalidJob, LoadJob, PlacementSpec, QuantizationSpec
from schemas.specs import DType
from worker.jobs.progress import Reporter
from worker.models import loader
from worker.models.estimate import estimate
from worker.models.resolve import resolve


def test_bnb_config_int8() -> None:
    config = loader.bnb_config(QuantizationSpec(method="int8", int8_threshold=4.0,
                                                skip_modules=("lm_head",)), DType.auto)
    assert config is not None and config.load_in_8bit and not config.load_in_4bit
    assert config.llm_int8_threshold == 4.0 and config.llm_int8_skip_modules == ["lm_head"]
    assert loader.bnb_config(QuantizationSpec(method="int8"), DType.auto).llm_int8_threshold == 6.0  # type: ignore[union-attr]
    assert loader.bnb_config(QuantizationSpec(), DType.float16) is None


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_bnb_config_four_bit(method: str) -> None:
    config = loader.bnb_config(QuantizationSpec(method=method, double_quant=True, compute_dtype="float16",
                                                skip_modules=("lm_head", "model.embed")), DType.auto)
    assert config is not None and config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == method and config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.float16
    assert config.llm_int8_skip_modules == ["lm_head", "model.embed"]
    plain = loader.bnb_config(QuantizationSpec(method=method), DType.auto)
    assert plain is not None and plain.bnb_4bit_use_double_quant is False
    assert plain.bnb_4bit_compute_dtype == torch.bfloat16 and plain.llm_int8_skip_modules is None
    follows_job = loader.bnb_config(QuantizationSpec(method=method), DType.float32)
    assert follows_job is not None and follows_job.bnb_4bit_compute_dtype == torch.float32


def test_placement_args() -> None:
    assert loader.placement_args(PlacementSpec(), "cpu") == {"device_map": "cpu"}
    assert loader.placement_args(PlacementSpec(), "cuda:0") == {"device_map": "cuda:0"}
    assert loader.placement_args(PlacementSpec(device_map="auto"), "cpu") == {"device_map": "auto"}
    assert loader.placement_args(PlacementSpec(device_map="cuda"), "cuda:0") == {"device_map": "cuda:0"}
    mixed = PlacementSpec(device_map={"model": 0, "lm_head": "cpu"}, max_memory={"0": "1GiB", "cpu": "2GiB"})
    assert loader.placement_args(mixed, "cuda:0") == {
        "device_map": {"model": "cuda:0", "lm_head": "cpu"}, "max_memory": {0: 2**30, "cpu": 2 * 2**30}}
    with pytest.raises(InvalidJob, match="runs on the CPU"):
        loader.placement_args(PlacementSpec(device_map="cuda:0"), "cpu")
    with pytest.raises(InvalidJob, match="one GPU"):
        loader.placement_args(PlacementSpec(device_map="cuda:1"), "cuda:0")


def test_model_key_is_stable_and_tells_loads_apart() -> None:
    job = LoadJob(model="/m")
    key = loader.model_key("path:/m#f1", job, "cpu")
    assert key == loader.model_key("path:/m#f1", LoadJob.model_validate_json(job.model_dump_json()), "cpu")
    assert len(key) == 32 and int(key, 16) >= 0
    others = {loader.model_key("path:/m#f2", job, "cpu"),
              loader.model_key("path:/m#f1", LoadJob(model="/m", dtype="bfloat16"), "cpu"),
              loader.model_key("path:/m#f1", LoadJob(model="/m", quantization="nf4"), "cpu"),
              loader.model_key("path:/m#f1", LoadJob(model="/m", quantization={
                  "method": "nf4", "double_quant": True}), "cpu"),
              loader.model_key("path:/m#f1", LoadJob(model="/m", placement={"device_map": "auto"}), "cpu")}
    assert key not in others and len(others) == 5
    # who asks, and which adapters ride along, do not change the base model
    assert loader.model_key("path:/m#f1", LoadJob(model="/m", adapters=["/a"], tenant="t2"), "cpu") == key


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_placements_that_put_the_model_on_the_one_device_share_a_key(device: str) -> None:
    """max_memory is read for a strategy only: beside one device or a module map it places
    nothing, so such loads are one resident copy."""
    gpu = device.startswith("cuda")
    same = [{}, {"max_memory": {"cpu": "1GiB"}}, {"max_memory": {"cpu": "2GiB"}},
            {"device_map": device}, {"device_map": {"": device}},
            {"device_map": {"model": device, "lm_head": device}, "max_memory": {"cpu": 12345}}]
    if gpu:
        same += [{"device_map": "cuda"}, {"device_map": "0"}, {"max_memory": {"0": "3GiB"}}]
    keys = {loader.model_key("path:/m#f1", LoadJob(model="/m", placement=p), device) for p in same}
    assert len(keys) == 1
    apart = [{"device_map": "auto"}, {"device_map": "auto", "max_memory": {"cpu": "1GiB"}}]
    if gpu:
        apart.append({"device_map": {"model": "cuda:0", "lm_head": "cpu"}})
    keys |= {loader.model_key("path:/m#f1", LoadJob(model="/m", placement=p), device) for p in apart}
    assert len(keys) == 1 + len(apart)


class _Mapped(torch.nn.Module):
    def __init__(self, mapping: dict[str, object]) -> None:
        super().__init__()
        self.hf_device_map = mapping
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_device_summary_collapses_runs_of_layers() -> None:
    mapping: dict[str, object] = {"model.embed_tokens": 0, **{f"model.layers.{i}": 0 for i in range(4)},
                                  **{f"model.layers.{i}": "cpu" for i in range(4, 7)},
                                  "model.layers.7": 0, "model.norm": "cpu", "lm_head": "cpu"}
    assert loader.device_summary(_Mapped(mapping), "cuda:0") == {
        "model.embed_tokens": "cuda:0", "model.layers.0-3": "cuda:0", "model.layers.4-6": "cpu",
        "model.layers.7": "cuda:0", "model.norm": "cpu", "lm_head": "cpu"}
    assert loader.device_summary(_Mapped({"model": 0, "lm_head": 0}), "cuda:0") == {"": "cuda:0"}
    assert loader.device_summary(torch.nn.Linear(2, 2), "cpu") == {"": "cpu"}


@pytest.fixture(scope="module")
def loaded(models: dict[str, Path]) -> dict[str, torch.nn.Module]:
    reporter = Reporter(lambda *_: None, lambda: False)
    resolved = resolve(LoadJob(model=str(models["llama"])).model)
    out = {}
    for method in ("none", "int8", "nf4", "fp4"):
        job = LoadJob(model=str(models["llama"]), dtype="bfloat16", quantization=method)
        out[method] = loader.load(resolved, job, "cpu", reporter)
    return out


def test_quantized_loads_are_smaller_and_hold_bnb_layers(loaded: dict[str, torch.nn.Module]) -> None:
    measured = {method: loader.measure(model) for method, model in loaded.items()}
    plain = measured["none"].footprint
    assert measured["none"].quantized_modules == 0
    # 2 layers x 7 projections; lm_head stays in full precision
    assert measured["int8"].quantized_modules == 14
    assert isinstance(loaded["int8"].model.layers[0].self_attn.q_proj, Linear8bitLt)
    for method in ("nf4", "fp4"):
        assert measured[method].quantized_modules == 14
        assert isinstance(loaded[method].model.layers[1].mlp.down_proj, Linear4bit)
        assert measured[method].footprint < measured["int8"].footprint < plain
    counts = {m.parameters for m in measured.values()}
    assert counts == {sum(p.numel() for p in loaded["none"].parameters())}
    tensors = [*loaded["none"].parameters(), *loaded["none"].buffers()]
    assert plain == sum(t.numel() * t.element_size() for t in tensors) == loader.footprint(loaded["none"])
    assert all(p.dtype == torch.bfloat16 for p in loaded["none"].parameters())
    assert not any(model.training for model in loaded.values())


def test_one_measuring_pass_gives_the_predicted_bytes(models: dict[str, Path],
                                                      loaded: dict[str, torch.nn.Module]) -> None:
    """The merged pass counts quantization state and tied storage as the estimate predicts them."""
    resolved = resolve(LoadJob(model=str(models["llama"])).model)
    for method, model in loaded.items():
        job = LoadJob(model=str(models["llama"]), dtype="bfloat16", quantization=method)
        assert loader.measure(model).footprint == estimate(resolved.base.path, resolved.config, job)
    tied = torch.nn.Linear(4, 4, bias=False)
    twice = torch.nn.Sequential(tied, torch.nn.Linear(4, 4, bias=False))
    twice[1].weight = tied.weight  # one storage, one parameter, counted once
    assert loader.measure(twice) == loader.Measured(parameters=16, footprint=64, quantized_modules=0)
