"""`python -m clients` is `retrieval-client`."""
from .cli import main

raise SystemExit(main())
