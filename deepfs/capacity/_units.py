"""Numbers with units, as an operator types them: ``175B``, ``1.5T``, ``2GB/s``, ``1000qps``, ``30min``, ``16TiB``.

Rules, the same for every kind of quantity:
- the number is a plain or scientific decimal (``7e9``, ``0.5``), never negative;
- decimal prefixes k, M, G, T, P are powers of 1000, binary ones Ki, Mi, Gi,
  Ti, Pi powers of 1024; the prefix letter's case does not matter (``gb`` is ``GB``);
- in a byte quantity ``B`` is a byte and ``b``/``bit`` a bit (``100Gb/s`` is
  12.5 GB/s): the one place where case carries meaning, as on every spec sheet;
- a model size counts parameters: ``175B`` is 175 billion (B, not G, because
  that is how models are named), ``1.5T`` 1.5 trillion, ``7e9`` seven billion.

Every parser returns a plain float in base units (parameters, bytes, bytes
per second, requests per second, seconds) or raises ``UnitError``, whose
message says what was wrong and what would have been accepted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "Rate",
    "UnitError",
    "format_bytes",
    "format_count",
    "format_duration",
    "format_rate",
    "parse_bandwidth",
    "parse_duration",
    "parse_fraction",
    "parse_model_size",
    "parse_rate",
    "parse_size",
]


class UnitError(ValueError):
    """The text is not a quantity of the kind asked for."""


_NUMBER = r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
_SPLIT = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>[A-Za-z/% ]*?)\s*$")

_DECIMAL = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_BINARY = {"ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40, "pi": 2.0**50}

_MODEL_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_DURATION_S = {
    "": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
    "y": 31_557_600.0, "yr": 31_557_600.0, "year": 31_557_600.0, "years": 31_557_600.0,
}
_BYTE_SUFFIXES = (("bytes", 1.0), ("byte", 1.0), ("bits", 0.125), ("bit", 0.125), ("B", 1.0), ("b", 0.125))
_PER_SECOND = ("/s", "ps", "/sec")
_REQUEST_UNITS = ("qps", "rps", "iops", "req/s", "requests/s", "samples/s", "q/s")


def _split(text: str, what: str, example: str) -> tuple[float, str]:
    match = _SPLIT.match(str(text))
    if match is None:
        raise UnitError(f"{text!r} is not a {what} (expected a number and a unit, e.g. {example})")
    value = float(match["num"])
    if not math.isfinite(value):
        raise UnitError(f"{text!r} is not a finite {what}")
    return value, match["unit"].replace(" ", "")


def _byte_multiplier(unit: str) -> float | None:
    """``GiB`` -> 2**30, ``TB`` -> 1e12, ``Gb`` -> 1e9/8, ``B``/``""`` -> 1; None when it is no byte unit."""
    prefix, per_unit = unit.lower(), 1.0
    for suffix, per in _BYTE_SUFFIXES:
        if unit.endswith(suffix):
            prefix, per_unit = unit[: -len(suffix)].lower(), per
            break
    scale = _BINARY.get(prefix, _DECIMAL.get(prefix))
    return None if scale is None else scale * per_unit


def parse_model_size(text: str) -> float:
    """Parameters: ``175B`` -> 1.75e11, ``70b`` -> 7e10, ``1.5T`` -> 1.5e12, ``350M``, ``7e9``."""
    value, unit = _split(text, "model size", "175B, 70B, 1.5T or 7e9")
    multiplier = _MODEL_SUFFIX.get(unit.lower())
    if multiplier is None:
        raise UnitError(f"{text!r}: unknown model-size suffix {unit!r} (use K, M, B, T or none: 175B, 1.5T, 7e9)")
    params = value * multiplier
    if params < 1:
        raise UnitError(f"{text!r}: a model has at least one parameter")
    return params


def parse_size(text: str) -> float:
    """Bytes: ``16TiB``, ``15.36TB``, ``512GB``, ``4MiB``, ``1024`` (plain bytes)."""
    value, unit = _split(text, "size", "16TiB, 15.36TB or 512GB")
    multiplier = _byte_multiplier(unit)
    if multiplier is None:
        raise UnitError(f"{text!r}: unknown size unit {unit!r} (use B, kB, MB, GB, TB, PB or KiB ... PiB)")
    return value * multiplier


def parse_duration(text: str) -> float:
    """Seconds: ``30min``, ``1h``, ``90s``, ``2d``, ``1.5h``, ``600`` (plain seconds)."""
    value, unit = _split(text, "duration", "30min, 1h or 90s")
    seconds = _DURATION_S.get(unit.lower())
    if seconds is None:
        raise UnitError(f"{text!r}: unknown time unit {unit!r} (use s, min, h, d, w or y)")
    return value * seconds


@dataclass(frozen=True, slots=True)
class Rate:
    """A throughput as typed: either requests per second or bytes per second, never both."""

    requests_per_s: float | None = None
    bytes_per_s: float | None = None

    def to_bytes_per_s(self, request_bytes: float) -> float:
        """Bytes per second, a request rate converted with ``request_bytes`` per request."""
        if self.bytes_per_s is not None:
            return self.bytes_per_s
        assert self.requests_per_s is not None
        return self.requests_per_s * request_bytes


def parse_rate(text: str) -> Rate:
    """``1000qps`` / ``5k rps`` / ``200iops`` -> requests; ``2GB/s``, ``500MiB/s``, ``100Gbps`` -> bytes/s."""
    value, unit = _split(text, "throughput", "1000qps, 2GB/s or 500MiB/s")
    lowered = unit.lower()
    for suffix in _REQUEST_UNITS:
        if lowered.endswith(suffix):
            scale = _DECIMAL.get(lowered[: -len(suffix)])
            if scale is not None:
                return Rate(requests_per_s=value * scale)
    for suffix in _PER_SECOND:
        if lowered.endswith(suffix) and len(unit) > len(suffix):
            multiplier = _byte_multiplier(unit[: -len(suffix)])
            if multiplier is not None:
                return Rate(bytes_per_s=value * multiplier)
    raise UnitError(f"{text!r}: unknown throughput unit {unit!r} "
                    "(use qps/rps/iops for requests, or a size per second: 2GB/s, 500MiB/s, 100Gbps)")


def parse_bandwidth(text: str) -> float:
    """Bytes per second only: like ``parse_rate`` but a request rate is an error."""
    rate = parse_rate(text)
    if rate.bytes_per_s is None:
        raise UnitError(f"{text!r}: expected a bandwidth (e.g. 2GB/s, 500MiB/s), not a request rate")
    return rate.bytes_per_s


def parse_fraction(text: str) -> float:
    """A share: ``1%`` or ``0.01`` -> 0.01; ``80%`` or ``0.8`` -> 0.8. Above 1 needs the ``%``."""
    value, unit = _split(text, "fraction", "1% or 0.01")
    if unit == "%":
        value /= 100.0
    elif unit:
        raise UnitError(f"{text!r}: a fraction is a plain number (0.01) or a percentage (1%)")
    if value > 1.0:
        raise UnitError(f"{text!r}: a fraction above 1; write a percentage with its sign (e.g. 80%)")
    return value


# ---------------------------------------------------------------- formatting
def format_bytes(n: float) -> str:
    """Decimal units, as disks are sold: ``2.80 TB``."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def format_rate(bytes_per_s: float) -> str:
    return format_bytes(bytes_per_s) + "/s"


def format_count(n: float) -> str:
    """Parameters the way models are named: ``175B``, ``1.5T``, ``350M``."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:.0f}"


def format_duration(seconds: float) -> str:
    """The largest unit that keeps the figure readable: ``42 s``, ``3.5 min``, ``2.1 h``, ``1.3e+09 y``."""
    if not math.isfinite(seconds):
        return "∞"
    for unit, scale in (("y", 31_557_600.0), ("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= scale:
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 1e4 else f"{value:.2e} {unit}"
    return f"{seconds:.3g} s"
