"""``python -m metadata``: run a metadata server (see ``metadata.server.main``)."""

import sys

from metadata.server import main

sys.exit(main())
