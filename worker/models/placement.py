"""Where a `device_map` strategy ("auto", "balanced", ...) puts a model, worked out before loading.

transformers turns a strategy into a module -> device map from the model's size and the
`max_memory` budgets. Two jobs whose budgets differ but give the same map are one model in
one place, so a worker keys and loads by the map a strategy resolves to (issue 13: a fuzz run
left 151 copies of one model resident, one per budget). The map is made the way
`from_pretrained` makes it (transformers 5.23, `modeling_utils` and
`integrations.accelerate._get_device_map`): the model class built on the meta device from
its config, the quantizer's layer swap and budget adjustment applied, then
`infer_auto_device_map` with the model's no-split classes. No weights are read.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.integrations.accelerate import _get_device_map
from transformers.modeling_utils import _get_dtype
from transformers.quantizers.auto import get_hf_quantizer
from transformers.utils.generic import ContextManagers

from schemas import LoadJob, PlacementSpec
from schemas.errors import ModelqError
from schemas.specs import DEVICE_MAP_STRATEGIES, DType
from worker.models.loader import TORCH_DTYPES, bnb_config, placement_args
from worker.models.resolve import Resolved

log = logging.getLogger(__name__)

DeviceMap = dict[str, str | int]


def strategy_map(resolved: Resolved, job: LoadJob, device: str) -> DeviceMap:
    """The module -> device map `from_pretrained` would make of `job`'s strategy on a worker
    pinned to `device`: the same budgets (free memory where `max_memory` names none), the
    same dtype, quantizer and no-split classes. Every module on one device is `{"": dev}`."""
    args = placement_args(job.placement, device)
    path = resolved.base.path
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    # a class transformers knows, else KeyError (remote code: left to from_pretrained)
    model_class: type[PreTrainedModel] = AutoModelForCausalLM._model_mapping[type(config)]  # type: ignore[assignment]
    quantization = bnb_config(job.quantization, job.dtype) if job.quantization.quantized else None
    quantizer, config, _ = get_hf_quantizer(config, quantization, args["device_map"], True, {})
    checkpoints = [str(p) for p in sorted(Path(path).glob("*.safetensors"))] or None
    wanted: Any = "auto" if job.dtype is DType.auto else TORCH_DTYPES[job.dtype]
    config, dtype = _get_dtype(wanted, checkpoints, config, None, None, True, quantizer)
    with ContextManagers(model_class.get_init_context(dtype, quantizer is not None, False, None)):
        model = model_class(config)
        if quantizer is not None:
            quantizer.preprocess_model(model=model, dtype=dtype, device_map=args["device_map"],
                                       checkpoint_files=checkpoints, use_kernels=False)
    mapping = _get_device_map(model, args["device_map"], args.get("max_memory"), quantizer)
    return {module: dev if isinstance(dev, int) else str(dev) for module, dev in mapping.items()}


class Placements:
    """A worker's strategies resolved to maps, remembered per request (identity, dtype,
    quantization, placement) so that one request keeps one key on this worker however its
    free memory moves, and resolves once. Bounded: the oldest are forgotten first."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._maps: OrderedDict[str, PlacementSpec] = OrderedDict()

    def concrete(self, resolved: Resolved, job: LoadJob, device: str) -> LoadJob:
        """`job` with a strategy replaced by the module map it resolves to (no budgets: a map
        places as written); `job` itself when its placement is not a strategy, or when the
        strategy cannot be resolved here (a remote-code class: transformers resolves it)."""
        if not (isinstance(job.placement.device_map, str)
                and job.placement.device_map in DEVICE_MAP_STRATEGIES):
            return job
        memo = json.dumps([resolved.base.identity, device, job.dtype.value,
                           job.quantization.model_dump(mode="json"),
                           job.placement.model_dump(mode="json")], sort_keys=True)
        spec = self._maps.get(memo)
        if spec is None:
            try:
                spec = PlacementSpec(device_map=strategy_map(resolved, job, device))
            except ModelqError:
                raise
            except Exception:
                log.warning("could not resolve device_map %r for %s before loading; "
                            "transformers places it", job.placement.device_map,
                            resolved.base.ref, exc_info=True)
                return job
            self._maps[memo] = spec
            while len(self._maps) > self.size:
                self._maps.popitem(last=False)
        self._maps.move_to_end(memo)
        return job.model_copy(update={"placement": spec})

