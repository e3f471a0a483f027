"""``python -m lorafit`` is the same as the ``lorafit`` command."""

import sys

from lorafit.cli import main

sys.exit(main())
