"""Legacy import path of :class:`~sbmoe.model.adapters.LinearAdapter`.

Models saved by sbmoe 0.1.0 name their head ``sbmoe.adapters.LinearAdapter`` in ``modules.json``;
sentence-transformers imports it by that path, so it must keep resolving.
"""

from sbmoe.model.adapters import LinearAdapter

__all__ = ["LinearAdapter"]
