"""Measuring what a delta gained, what it forgot, how well it knows what it knows, and what it cost.

- :mod:`.answers`: answer extraction and numeric-answer accuracy (GSM8K's ``#### n``).
- :mod:`.calibration`: expected calibration error and the reliability diagram.
- :mod:`.retention`: held-out general-text loss of a model against its base on the same text.
- :mod:`.diagnostics`: weight-space diagnostics of a delta (spectrum, effective rank, intruder
  dimensions, norms), through each method's own ``delta_weight()``.
- :mod:`.ledger`: the cost ledger a training run writes (parameters, bytes, time, speed, memory, FLOPs).
- :mod:`.report`: side-by-side tables, plots and the static HTML report of ``deltatune compare``.
"""
