"""`python -m retrieval_server serve ...`."""

import sys

from .cli import main

sys.exit(main())
