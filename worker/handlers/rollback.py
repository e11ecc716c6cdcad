"""A cache entry put back as it was before a task that changes adapters failed.

A `changes_adapters` task works on the resident model itself: peft injects LoRA layers into
the base's modules in place (`get_peft_model`, `add_adapter`), so a task that raises halfway
would leave the entry holding a model with half-injected layers, frozen parameters, or a
wrapper the entry does not know. `Before.take` notes what the entry holds before the task;
`Before.restore` undoes what the task did to it: adapters it added are deleted, tuner layers
it injected are replaced by their base layers, parameters' `requires_grad`, the training
mode and the active adapters are set back, and the entry holds its old model object again.
Weights of adapters that were there before are not copied here: `modelq.train_adapter` keeps
a copy of the one it trains and puts it back itself (builtin/train.py); a user task that
trains an existing adapter in place and then fails leaves it as the failure found it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from worker.models import adapters
from worker.models.cache import Entry
from worker.modeltasks import activation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Before:
    """What a cache entry held before a task that changes adapters."""

    model: torch.nn.Module
    adapters: dict[str, str]
    attached: frozenset[str]
    state: activation.AdapterState | None
    layers: frozenset[int]  # ids of the tuner layers in the model
    grads: dict[int, bool]  # id of each parameter -> its requires_grad
    training: bool
    had_peft_config: bool

    @classmethod
    def take(cls, entry: Entry) -> Before:
        model = entry.model
        return cls(model=model, adapters=dict(entry.adapters),
                   attached=frozenset(adapters.names(model)[0]),
                   state=activation.adapter_state(model),
                   layers=frozenset(id(m) for m in model.modules() if isinstance(m, BaseTunerLayer)),
                   grads={id(p): p.requires_grad for p in model.parameters()},
                   training=model.training, had_peft_config=hasattr(model, "peft_config"))

    def restore(self, entry: Entry) -> None:
        """Put the entry back as `take` found it (best effort per step, each logged)."""
        model = self.model
        if isinstance(model, PeftModel):
            for name in [n for n in model.peft_config if n not in self.attached]:
                try:
                    model.delete_adapter(name)
                except Exception:
                    log.exception("could not delete adapter %s from %s", name, entry.key)
        stripped = _strip_layers(model, self.layers)
        if not self.had_peft_config and hasattr(model, "peft_config"):
            del model.peft_config
        for parameter in model.parameters():
            wanted = self.grads.get(id(parameter))
            if wanted is not None and parameter.requires_grad != wanted:
                parameter.requires_grad_(wanted)
        model.train(self.training)
        try:
            activation.restore(model, self.state)
        except Exception:
            log.exception("could not restore the active adapters of %s", entry.key)
        entry.model = model
        entry.adapters = dict(self.adapters)
        log.info("model %s put back as it was before the failed task (%d injected layer(s) "
                 "removed)", entry.key, stripped)


def _strip_layers(model: torch.nn.Module, keep: frozenset[int]) -> int:
    """Replace every tuner layer not in `keep` by its base layer; how many were replaced."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, BaseTunerLayer) and id(module) not in keep]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return len(found)
