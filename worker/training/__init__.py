"""Training a LoRA adapter on a resident model: data, checkpoints, the 4-bit base, the loop's parts.

`modelq.train_adapter` (worker/modeltasks/builtin/train.py) is built from these modules:
data.py reads and masks the dataset formats, checkpoints.py writes and finds resumable
state, kbit.py keeps a shared (possibly 4-bit) base as it was, schedule.py makes the
optimizer and learning-rate schedule, report.py writes TensorBoard events when asked.
Nothing here knows Redis, records or the cache.
"""
