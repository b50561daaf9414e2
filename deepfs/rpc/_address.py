"""Addresses of framed servers as they appear in configuration and URLs.

A metadata address may be a list: ``"h1:7700,h2:7700,[::1]:7700"`` names
several metadata servers of one cluster (``parse_addresses``); a client
uses one at a time and fails over to the next (``deepfs.client``).
"""

from __future__ import annotations

from errno import EINVAL

MAX_PORT = 65535


class AddressError(ValueError):
    """A malformed address or address list (``errno`` EINVAL, like the syscalls' bad arguments)."""

    errno: int = EINVAL


def parse_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' → (host, port), with a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep:
        if default_port is None:
            raise AddressError(f"address {address!r} must be HOST:PORT")
        return address, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise AddressError(f"address {address!r} must be HOST:PORT") from None


def parse_addresses(addresses: str) -> list[tuple[str, int]]:
    """'h1:p1,h2:p2' → [(h1, p1), (h2, p2)]: one or more HOST:PORT, comma-separated, in order,
    each listed once. An empty entry, a missing host or port, or a port outside 1..65535 is an
    ``AddressError`` (a ``ValueError`` whose ``errno`` is EINVAL) naming the entry."""
    if not isinstance(addresses, str) or not addresses.strip():
        raise AddressError(f"metadata address {addresses!r} is empty; expected HOST:PORT[,HOST:PORT...]")
    parsed: list[tuple[str, int]] = []
    for number, entry in enumerate(addresses.split(","), 1):
        entry = entry.strip()
        where = f"address list {addresses!r}, entry {number}"
        if not entry:
            raise AddressError(f"{where} is empty; expected HOST:PORT[,HOST:PORT...]")
        host, sep, port = entry.rpartition(":")
        host = host.strip()
        if host.startswith("[") != host.endswith("]"):
            raise AddressError(f"{where} ({entry!r}): unbalanced brackets; write IPv6 as [ADDR]:PORT")
        host = host[1:-1] if host.startswith("[") else host
        if not sep or not host or not port.strip().isdigit():
            raise AddressError(f"{where} ({entry!r}) must be HOST:PORT")
        number_port = int(port)
        if not 1 <= number_port <= MAX_PORT:
            raise AddressError(f"{where} ({entry!r}): port {number_port} is outside 1..{MAX_PORT}")
        if ":" in host and not entry.startswith("["):
            raise AddressError(f"{where} ({entry!r}): write IPv6 as [ADDR]:PORT")
        if (host, number_port) not in parsed:
            parsed.append((host, number_port))
    return parsed


def format_address(host: str, port: int) -> str:
    """(host, port) → 'host:port' ('[host]:port' for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_addresses(addresses: str | list[tuple[str, int]]) -> str:
    """The canonical form of an address list ('h1:p1,h2:p2'): the same cluster written the same way."""
    pairs = parse_addresses(addresses) if isinstance(addresses, str) else addresses
    return ",".join(format_address(host, port) for host, port in pairs)
