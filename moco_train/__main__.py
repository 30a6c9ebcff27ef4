"""`python -m moco_train ...` is `moco-train ...`."""

import sys

from .cli import main

sys.exit(main())
