"""Chunk size parameters: one validated value type, and its text form for CLIs."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

# The ranges fastcdc 1.7.0 asserts in fastcdc_cy (MINIMUM_MIN..MAXIMUM_MAX). Checking them
# here turns its bare AssertionError into a message, and keeps working under `python -O`.
_RANGES: dict[str, tuple[int, int]] = {
    "min_size": (64, 67_108_864),
    "avg_size": (256, 268_435_456),
    "max_size": (1024, 1_073_741_824),
}

_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20}
_SIZE = re.compile(r"([0-9]{1,15})([km]?)", re.IGNORECASE)


class ChunkParamsError(ValueError):
    """Chunk parameters that fastcdc would reject, or text that is not a size triple."""


def parse_size(text: str) -> int:
    """Parse one size: a plain integer, or one with a k (KiB) or m (MiB) suffix."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ChunkParamsError(
            f"chunk size {text!r} must be an integer with an optional k or m suffix"
        )
    digits, suffix = match.groups()
    return int(digits) * _SUFFIXES[suffix.lower()]


def format_size(value: int) -> str:
    """The shortest text that parse_size reads back as value (``16384`` -> ``16k``)."""
    # Largest suffix that divides exactly, so that parse(str(p)) == p always holds.
    for suffix in ("m", "k"):
        unit = _SUFFIXES[suffix]
        if value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


@dataclass(frozen=True)
class ChunkParams:
    """Minimum, average (target) and maximum chunk size in bytes.

    Every chunk but the last of a buffer is between min_size and max_size long; the
    average is the size the cut masks aim at. Construction validates the values against
    the limits fastcdc enforces and raises ChunkParamsError with a one-line message.
    """

    min_size: int = 4096
    avg_size: int = 16384
    max_size: int = 65536

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            # bool is an int subclass, but True as a size is always a mistake.
            if not isinstance(value, int) or isinstance(value, bool):
                raise ChunkParamsError(
                    f"{field.name} {value!r} must be an int, not {type(value).__name__}"
                )
        for name, (low, high) in _RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ChunkParamsError(f"{name} {value} must be between {low} and {high}")
        if self.min_size >= self.avg_size:
            raise ChunkParamsError(
                f"min_size {self.min_size} must be less than avg_size {self.avg_size}"
            )
        if self.avg_size >= self.max_size:
            raise ChunkParamsError(
                f"avg_size {self.avg_size} must be less than max_size {self.max_size}"
            )

    @classmethod
    def parse(cls, text: str) -> ChunkParams:
        """Parse ``MIN/AVG/MAX`` such as ``"4k/16k/64k"`` or ``"4096/16384/65536"``.

        Each size is a plain integer or one with a ``k`` (KiB) or ``m`` (MiB) suffix,
        case-insensitive. Raises ChunkParamsError for malformed text or invalid values.
        """
        parts = text.split("/")
        if len(parts) != 3:
            raise ChunkParamsError(f"chunk params {text!r} must be MIN/AVG/MAX, e.g. 4k/16k/64k")
        low, avg, high = (parse_size(part) for part in parts)
        return cls(low, avg, high)

    def __str__(self) -> str:
        return "/".join(format_size(v) for v in (self.min_size, self.avg_size, self.max_size))


DEFAULT_PARAMS = ChunkParams()
