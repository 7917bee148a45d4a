"""Settings as dataclasses that save themselves: the model, training and per-job configs, the named
presets and provenance.

Each field carries its command-line flag (help, choices, default; :mod:`sbmoe.config.fields`), so a
setting is declared once. Configs round-trip through JSON and tolerate keys a newer version wrote
(:mod:`sbmoe.config.base`). Nothing here imports torch.
"""
