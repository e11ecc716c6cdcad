"""modelq worker runtime: the only layer that imports torch, transformers, peft, bitsandbytes."""
