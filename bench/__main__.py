"""``python -m bench`` is ``deepfs bench``: one parser, in deepfs/cli.py."""

import sys

from deepfs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]], prog_name="python -m bench"))
