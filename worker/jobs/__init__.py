"""One job on a worker: decode and run a delivery, lease it, guard it, report its progress.

Read in that order: gate (which messages run at all) -> runner (one delivery) -> lease
(no second start) -> attempt (one leased try under a guard) -> guard (cancel, deadline,
watchdog) -> progress (stage and step events).
"""
