"""`python -m retrieval_web` is `retrieval-web`."""

import sys

from .cli import main

sys.exit(main())
