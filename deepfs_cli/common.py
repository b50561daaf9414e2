"""What the ``deepfs`` commands share: the data-directory option and the failure rule.

Failure rule: every failure ends in one line on stderr and exit status 1.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

DEFAULT_DATA_DIR = "./deepfs-data"

data_dir_option = click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True,
                               type=click.Path(file_okay=False))


def fail(message: str) -> NoReturn:
    """End the command with ``message`` as its one line on stderr."""
    click.echo(f"deepfs: {message}", err=True)
    sys.exit(1)
