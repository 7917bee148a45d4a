"""``python -m sbmoe``: the ``sbmoe`` command, as ``python -m sbmoe.cli`` is."""

import sys

from sbmoe.cli.main import main

sys.exit(main())
