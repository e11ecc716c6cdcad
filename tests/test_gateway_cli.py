"""`modelq gateway` refuses to listen beyond loopback without API keys (the running gateway,
and the line it prints about where it listens, are tests/test_gateway_load.py's)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tasks.cli.main import _loopback, main


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.example.com"])
def test_beyond_loopback_without_tenant_keys_exits_2_saying_what_to_do(
        host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELQ_TENANTS_FILE", raising=False)
    result = CliRunner().invoke(main, ["gateway", "--host", host, "--port", "1"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"refusing to listen on {host} without API keys" in message
    assert "MODELQ_TENANTS_FILE" in message and "--allow-unauthenticated" in message


def test_loopback_is_this_machine_only() -> None:
    assert all(map(_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost", "LOCALHOST"]))
    assert not any(map(_loopback, ["0.0.0.0", "::", "192.168.1.1", "example.com", ""]))
