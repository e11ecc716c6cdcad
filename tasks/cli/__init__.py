"""The `modelq` command line (no torch): `main.py` is the group and the commands that read
the pool and records; `jobs.py`, `run.py`, `train.py` and `evaluate.py` submit jobs;
`common.py` is what they share; `render.py`, `watch.py`, `pool_listing.py` and
`pool_summary.py` show things to a person; `schema_doc.py` is `modelq schema`.

Nothing is imported here, so that `modelq status` loads only what it needs.
"""
