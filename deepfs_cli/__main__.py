"""``python -m deepfs_cli`` is the ``deepfs`` command (the tests run it this way)."""

from deepfs_cli.main import main

main()
