"""Test-support helpers: a real redis-server process and tiny on-disk models. No tests here."""
