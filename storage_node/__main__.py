"""``python -m storage_node``: run a storage node (same as ``deepfs node serve``)."""

import sys

from storage_node.server import main

sys.exit(main())
