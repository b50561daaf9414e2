"""``python -m bench`` is ``deepfs bench``: one command, defined in deepfs/cli.py."""

import sys

from deepfs.cli import bench

if __name__ == "__main__":
    sys.exit(bench.main(sys.argv[1:], prog_name="python -m bench"))
