"""Tasks that run on a resident model: the registry and `TaskContext`, their I/O and adapter activation.

registry (`model_task`, `TaskContext`, `call_task`) -> io (results, paths, tokenizer) ->
activation (which adapters a call sees) -> builtin/ (the tasks modelq ships).
"""
