"""``python -m chatloop.cli``: the same as the ``chatloop`` command."""

import sys

from chatloop.cli import main

sys.exit(main())
