"""``python -m cache_router``: the same CLI as the ``cache-router`` command."""

import sys

from cache_router.cli import main

sys.exit(main())
