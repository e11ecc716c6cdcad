"""The routing index entries a worker's registry entry implies, as its memo lists them (no torch).

A worker's heartbeat writes its entry and these entries together (worker/recovery/heartbeat.py,
tasks/state/lua/registry_publish.lua); a producer routes from them (tasks/state/lua/route.lua); the
reaper undoes them, and drains the worker's own queues, from the memo alone
(tasks/state/lua/registry_leave.lua), so nothing on those paths scans the registry or the keyspace.
Key names come from tasks/state/keys.py; this module only says which keys a worker is in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from schemas import WorkerInfo
from tasks.state.keys import Keys


def memo(keys: Keys, info: WorkerInfo, queues: Iterable[str] = ()) -> dict[str, Any]:
    """What worker `info` is indexed under, and its own queues with their destinations.

    'serving': the sets (`Keys.serving`) of the request keys its models serve; 'holders':
    each model's holders hash (`Keys.holders`) with the model's tenant; 'free': the free-bytes
    zsets it is in (every worker's, and each offered task's); 'tasks': the tasks it offers;
    'queues': [own queue, shared destination] for its own queue and each of `queues` that is
    one of its own (tenant shares), as `Keys.orphan_destination` maps them.
    """
    own = [info.queue, *(q for q in queues if q != info.queue)]
    destinations = [(q, keys.orphan_destination(q)) for q in own]
    return {
        "serving": sorted({keys.serving(k) for m in info.models for k in m.request_keys}),
        "holders": {keys.holders(m.model_key): m.tenant for m in info.models},
        "free": [keys.free(), *(keys.free(task) for task in info.tasks)],
        "tasks": list(info.tasks),
        "queues": [[q, target[1]] for q, target in destinations
                   if target is not None and target[0] == info.name],
    }


def memo_json(keys: Keys, info: WorkerInfo, queues: Iterable[str] = ()) -> str:
    """`memo` as the JSON the scripts read (keys sorted: equal memos, equal bytes)."""
    return json.dumps(memo(keys, info, queues), sort_keys=True, separators=(",", ":"))
