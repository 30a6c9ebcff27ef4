"""`python -m retrieval_client` is `retrieval-client`."""

from .cli import main

raise SystemExit(main())
