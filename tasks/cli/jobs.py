"""`modelq load`, `attach`, `detach`, `unload`: the commands that change what is resident (no torch).

`load_options` and `load_spec` are shared with the commands that load a model on the way
(`modelq run REF`, `modelq generate REF`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from tasks.cli.common import INVALID, adapter_arg, fail, local_ref, submit_and_report, tenant_option

F = TypeVar("F", bound=Callable[..., Any])

_LOAD_OPTIONS = [
    click.option("--revision", default=None, help="Branch, tag or commit of a hub repo."),
    click.option("--dtype", default="auto", show_default=True,
                 type=click.Choice(["auto", "float32", "bfloat16", "float16"])),
    click.option("--quant", default="none", show_default=True,
                 type=click.Choice(["none", "int8", "nf4", "fp4"])),
    click.option("--double-quant/--no-double-quant", default=None, help="4-bit: quantize the scales too."),
    click.option("--compute-dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
                 help="4-bit: dtype of the matmuls."),
    click.option("--int8-threshold", default=None, type=float, help="int8: outlier threshold."),
    click.option("--skip-module", "skip_modules", multiple=True, help="Module left unquantized (repeat)."),
    click.option("--device-map", default=None,
                 help="auto, balanced, sequential, a device (cpu, cuda:0) or a JSON module map."),
    click.option("--max-memory", multiple=True, metavar="DEV=SIZE",
                 help="e.g. 0=20GiB, cpu=30GiB (repeat)."),
    click.option("--load-adapter", "load_adapters", multiple=True, metavar="REF[:NAME]",
                 help="Adapter to attach when loading (repeat)."),
    click.option("--active-adapter", default=None, help="Adapter to activate (default: the last)."),
    click.option("--trust-remote-code", is_flag=True, help="Allow the repo's own code (pinned commit only)."),
    click.option("--pin", is_flag=True, help="Never evict it to make room (only unload frees it)."),
    click.option("--keep-alive", "keep_alive", default=None, type=float, metavar="SECONDS",
                 help="Unload it after this many seconds unused."),
]


def load_options(command: F) -> F:
    """The options that describe how to load a model (see `load_spec`)."""
    for option in reversed(_LOAD_OPTIONS):
        command = option(command)
    return command


def load_spec(ref: str, tenant: str, flags: dict[str, Any]) -> dict[str, Any]:
    """A load job's JSON from REF and the `load_options` flags."""
    from schemas.refs import is_local_path  # here: `modelq ls` imports this module, not schemas

    model: dict[str, Any] = ({"path": local_ref(ref)} if os.path.isdir(ref) or is_local_path(ref)
                             else {"repo_id": ref})
    if flags.get("revision"):
        model["revision"] = flags["revision"]
    quantization: dict[str, Any] = {"method": flags.get("quant", "none")}
    for key in ("double_quant", "compute_dtype", "int8_threshold"):
        if flags.get(key) is not None:
            quantization[key] = flags[key]
    if flags.get("skip_modules"):
        quantization["skip_modules"] = list(flags["skip_modules"])
    placement: dict[str, Any] = {}
    device_map = flags.get("device_map")
    if device_map:
        placement["device_map"] = json.loads(device_map) if device_map.startswith("{") else device_map
    if flags.get("max_memory"):
        try:
            placement["max_memory"] = dict(item.split("=", 1) for item in flags["max_memory"])
        except ValueError:
            fail("--max-memory takes DEV=SIZE, e.g. 0=20GiB", INVALID)
    job: dict[str, Any] = {
        "kind": "load", "model": model, "dtype": flags.get("dtype", "auto"),
        "quantization": quantization, "placement": placement, "tenant": tenant,
        "adapters": [adapter_arg(a) for a in flags.get("load_adapters", ())],
        "trust_remote_code": bool(flags.get("trust_remote_code")), "pin": bool(flags.get("pin")),
        "keep_alive_seconds": flags.get("keep_alive")}
    if flags.get("active_adapter"):
        job["active_adapter"] = flags["active_adapter"]
    return job


@click.command()
@click.argument("ref")
@load_options
@click.option("--adapter", "adapters", multiple=True, metavar="REF[:NAME]",
              help="Adapter to attach (repeat).")
@tenant_option()
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit code says how.")
@click.option("--timeout", default=None, type=float, help="Seconds to wait (with --wait).")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def load(ref: str, adapters: tuple[str, ...], tenant: str, wait: bool, timeout: float | None,
         as_json: bool, **flags: Any) -> None:
    """Submit a load job for REF (a hub repo id or a local folder); prints its id."""
    flags["load_adapters"] = (*flags.get("load_adapters", ()), *adapters)
    submit_and_report(load_spec(ref, tenant, flags), wait, timeout, as_json)


@click.command()
@click.argument("model_key")
@click.argument("adapter_ref")
@click.option("--name", default="default", show_default=True, help="Adapter name on the model.")
@click.option("--revision", default=None, help="Branch, tag or commit of a hub adapter repo.")
@click.option("--no-activate", is_flag=True, help="Attach without making it active.")
@tenant_option()
@click.option("--wait", is_flag=True)
@click.option("--timeout", default=None, type=float)
@click.option("--json", "as_json", is_flag=True)
def attach(model_key: str, adapter_ref: str, name: str, revision: str | None, no_activate: bool,
           tenant: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Attach ADAPTER_REF to the resident model MODEL_KEY."""
    ref = local_ref(adapter_ref)
    adapter: Any = {"path": ref} if os.path.isdir(adapter_ref) else ref
    if revision:
        adapter = {"repo_id": adapter_ref, "revision": revision}
    submit_and_report({"kind": "attach", "model_key": model_key, "adapter": adapter, "name": name,
                       "activate": not no_activate, "tenant": tenant}, wait, timeout, as_json)


@click.command()
@click.argument("model_key")
@tenant_option()
@click.option("--wait", is_flag=True)
@click.option("--timeout", default=None, type=float)
@click.option("--json", "as_json", is_flag=True)
def unload(model_key: str, tenant: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Free the resident model MODEL_KEY."""
    submit_and_report({"kind": "unload", "model_key": model_key, "tenant": tenant}, wait, timeout,
                      as_json)


@click.command()
@click.argument("model_key")
@click.argument("name")
@tenant_option()
@click.option("--wait", is_flag=True)
@click.option("--timeout", default=None, type=float)
@click.option("--json", "as_json", is_flag=True)
def detach(model_key: str, name: str, tenant: str, wait: bool, timeout: float | None,
           as_json: bool) -> None:
    """Detach the adapter NAME from the resident model MODEL_KEY (the model stays)."""
    submit_and_report({"kind": "unload", "model_key": model_key, "adapter": name, "tenant": tenant},
                      wait, timeout, as_json)


COMMANDS = [load, attach, unload, detach]
