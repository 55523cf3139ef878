"""``python -m rsitr.train``: the Ray job entry point."""

import sys

from rsitr.train.command import main

sys.exit(main())
