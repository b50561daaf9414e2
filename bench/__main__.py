"""``python -m bench`` is ``deepfs bench``: one command, defined in bench/command.py."""

import sys

from bench.command import bench

if __name__ == "__main__":
    sys.exit(bench.main(sys.argv[1:], prog_name="python -m bench"))
