"""Models on a worker: resolve a reference, estimate its bytes, place, load, cache, and attach adapters.

Read in that order: resolve -> estimate -> placement -> loader (artifacts for quantized
weights) -> admission (make room, load) -> cache -> residents (what handlers see) -> adapters.
"""
