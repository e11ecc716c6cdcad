"""The bench's side of the simulated workers: `bench/scale_sim.py` processes, started and told.

Each host process runs its share of the simulated workers; this module writes their
configs, waits until every one registered, and sends them `pause`, `resume`, `kill`,
`stats` and `quit`, one JSON line back per command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


class SimHosts:
    """`count` simulated workers named `sim-NNNNN` over `processes` host processes."""

    def __init__(self, run_dir: Path, config: dict[str, Any], count: int, processes: int) -> None:
        self.names = [f"sim-{i:05d}" for i in range(count)]
        self.procs: list[subprocess.Popen[str]] = []
        self.owner: dict[str, int] = {}
        processes = max(1, min(processes, count))
        for p in range(processes):
            names = self.names[p::processes]
            self.owner.update({name: p for name in names})
            path = run_dir / f"sim-{count}-{p}.json"
            path.write_text(json.dumps({**config, "names": names}))
            log = open(run_dir / f"sim-{count}-{p}.log", "w")  # noqa: SIM115 - the process keeps it
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.scale_sim", str(path)], cwd=ROOT, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log))
        for proc in self.procs:
            ready = self._reply(proc)
            if "ready" not in ready:
                raise RuntimeError(f"a simulated worker host did not start: {ready}")

    @staticmethod
    def _reply(proc: subprocess.Popen[str]) -> dict[str, Any]:
        line = _stream(proc.stdout).readline()
        if not line:
            raise RuntimeError(f"simulated worker host {proc.pid} exited (see its log)")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _send(self, proc: subprocess.Popen[str], line: str) -> None:
        stdin = _stream(proc.stdin)
        stdin.write(line + "\n")
        stdin.flush()

    def tell(self, line: str) -> list[dict[str, Any]]:
        """Send `line` to every host; their answers."""
        for proc in self.procs:
            self._send(proc, line)
        return [self._reply(proc) for proc in self.procs]

    def kill(self, name: str) -> float:
        """Stop `name`'s beats as its death would; the wall time of its last beat."""
        proc = self.procs[self.owner[name]]
        self._send(proc, f"kill {name}")
        return float(self._reply(proc)["last_beat"])

    def quit(self) -> dict[str, Any]:
        """Stop every host (the live workers leave the registry); their beat statistics."""
        stats = self.tell("quit")
        for proc in self.procs:
            proc.wait(timeout=60)
        return {"beats": sum(s["beats"] for s in stats),
                "beat_late_p99_s": round(max(s["late_p99"] for s in stats), 3),
                "beat_late_max_s": round(max(s["late_max"] for s in stats), 3),
                "entry_bytes": stats[0]["entry_bytes"]}

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _stream(stream: IO[str] | None) -> IO[str]:
    assert stream is not None
    return stream
