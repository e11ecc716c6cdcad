"""Liveness and recovery: the registry heartbeat, and putting back what dead workers or bad bytes left.

heartbeat (the worker's registry entry) -> reaper (jobs of dead workers) -> rescue (jobs with
no live message) -> quarantine (queue bytes that cannot be decoded are moved aside).
"""
