"""The lowest layer: errors, atomic file output, what each kind of artifact holds (``layouts``: its file
names, declared once), output artifacts and their locks, runs, named choices, what the CPU is
(``cpu``), and where computation runs (device, precision, seeding, torch.distributed).

Everything else builds on it and it imports nothing of sbmoe above it. ``errors``, ``io``, ``choices``
and ``cpu`` use the standard library only, so ``sbmoe --help`` and config handling never pay for torch.
"""
