"""What modelq keeps in Redis (no torch): `keys.py` owns the key layout; `store.py` job
records and events, `registry.py` (with `registry_entries.py` and `index.py`) the worker
registry and routing, `model_specs.py` load specs by model key, `turns.py` tenants' fair
turns, `events.py` following a job's events, `scripts.py` the Lua in `lua/`, and
`connection.py` connecting to Redis."""
