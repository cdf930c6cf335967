"""``python -m simulators``: the ``xsettle`` command without its console script.

The project's top-level packages are fixed by its layout (``bus``, ``adapters``, ``schemas``,
``simulators``); there is no ``xsettle`` package to run with ``python -m xsettle``, and the
command's entry point lives here.
"""

import sys

from simulators.cli import main

sys.exit(main())
