"""``python -m sbmoe.cli``: the ``sbmoe`` command (what ``torchrun ... -m sbmoe.cli`` starts)."""

import sys

from sbmoe.cli.main import main

sys.exit(main())
