"""Addresses of framed servers as they appear in configuration and URLs."""

from __future__ import annotations


def parse_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' → (host, port), with a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"address {address!r} must be HOST:PORT")
        return address, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"address {address!r} must be HOST:PORT") from None
