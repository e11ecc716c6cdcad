"""The Lua scripts in tasks/state/lua/, read once per process and registered once per client (no torch).

Each .lua file starts with a comment listing its KEYS and ARGV; callers pass them in that
order. A script is one whole file: no Lua is assembled from pieces in Python.
"""

from __future__ import annotations

import threading
import weakref
from functools import cache
from importlib import resources

import redis
from redis.commands.core import Script

_registered: weakref.WeakKeyDictionary[redis.Redis, dict[str, Script]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@cache
def source(name: str) -> str:
    """The Lua of tasks/state/lua/`name`.lua (package data, read once)."""
    return resources.files("tasks.state").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def script(client: redis.Redis, name: str) -> Script:
    """Script `name` registered on `client`: called with (keys, args), it runs by digest and
    loads itself again when Redis forgot it (a restart)."""
    with _lock:
        scripts = _registered.setdefault(client, {})
        found = scripts.get(name)
        if found is None:
            found = scripts[name] = client.register_script(source(name))
        return found
