"""`modelq gateway`, the HTTP API (needs the `gateway` extra; no torch): `api.py` builds the
FastAPI app and its routes, `http.py` is its edge (the error shape, bounded bodies),
`events.py` its event streams, `openapi.py` its OpenAPI document."""
