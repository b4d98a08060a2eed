"""``python -m belle_edge.cli``: the same as the ``belle-edge`` command."""
import sys

from . import main

sys.exit(main())
