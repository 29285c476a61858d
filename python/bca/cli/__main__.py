"""``python -m bca.cli``: the ``bca`` program."""

import sys

from . import main

sys.exit(main())
