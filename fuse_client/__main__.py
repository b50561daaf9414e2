"""``python -m fuse_client META MOUNTPOINT [options]``: see ``fuse_client.main``."""

import sys

from fuse_client.main import main

sys.exit(main(prog="python -m fuse_client"))
