"""Legacy import path of :class:`~sbmoe.model.moe_head.MoEHead`.

Models saved by sbmoe 0.1.0 name their head ``sbmoe.moe_head.MoEHead`` in ``modules.json``;
sentence-transformers imports it by that path, so it must keep resolving.
"""

from sbmoe.model.moe_head import MoEHead

__all__ = ["MoEHead"]
