"""prometheus_client's multiprocess file format, written and read without importing prometheus_client.

The master writes its metrics into these files and folds dead workers' files into archives. Importing
prometheus_client there would put its 1.5 MB of module objects into every worker gunicorn forks, so the
master speaks the format itself; only the /metrics process (see metrics_process) imports the library.
``tests/test_mmapfile.py`` checks each direction against the installed prometheus_client.

The format: a 4-byte little-endian count of bytes used (from the start of the file), 4 bytes of padding,
then entries. An entry is a 4-byte key length, the UTF-8 key, spaces up to 8-byte alignment (always at
least one byte of them), and two doubles: the value and a timestamp.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable

from .._space import reserve

_USED = struct.Struct("<i")
_VALUE = struct.Struct("<dd")
_HEADER = 8
_INITIAL_SIZE = 1 << 16


def sample_key(metric: str, sample: str, labels: dict[str, str], documentation: str) -> str:
    """The key prometheus_client stores for one sample (sorted, so equal samples share one key)."""
    return json.dumps([metric, sample, labels, documentation], sort_keys=True)


def go_float(value: float) -> str:
    """A bucket bound as prometheus_client writes its ``le`` label (Go's formatting of a float)."""
    if value == math.inf:
        return "+Inf"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to an exponent where Python still writes digits
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _key_field(length: int) -> int:
    """Bytes from an entry's start to its value: the length, the key, and 1 to 8 bytes of padding."""
    return 4 + length + 8 - (length + 4) % 8


def _entry(key: str) -> bytes:
    encoded = key.encode("utf-8")
    return _USED.pack(len(encoded)) + encoded.ljust(_key_field(len(encoded)) - 4, b" ") + _VALUE.pack(0.0, 0.0)


def _scan(data: bytes | mmap.mmap, used: int) -> list[tuple[str, int]]:
    """Every key in the first ``used`` bytes with the position of its value; ValueError when one overruns."""
    found = []
    position = _HEADER
    while position < used:
        (length,) = _USED.unpack_from(data, position)
        if length < 0 or position + 4 + length + 16 > used:
            raise ValueError(f"an entry at byte {position} runs past the {used} bytes in use: the file is corrupt")
        value_at = position + _key_field(length)
        found.append((bytes(data[position + 4 : position + 4 + length]).decode("utf-8"), value_at))
        position = value_at + 16
    return found


def parse(data: bytes | mmap.mmap, used: int) -> list[tuple[str, float, float]]:
    """Every (key, value, timestamp) in the first ``used`` bytes; ValueError when an entry overruns."""
    return [(key, *_VALUE.unpack_from(data, position)) for key, position in _scan(data, used)]


def read_file(path: str) -> list[tuple[str, float, float]]:
    """A file's samples, read without mapping it (a writer may be growing it)."""
    with open(path, "rb") as handle:
        data = handle.read(mmap.PAGESIZE)
        if len(data) < _HEADER:
            return []  # cut short by a kill before its header was written
        (used,) = _USED.unpack_from(data, 0)
        if used > len(data):
            data += handle.read(used - len(data))
    return parse(data, min(used, len(data)))


class MetricFile:
    """One writer's file: values are written in place, new keys are appended, then published in the header."""

    def __init__(self, path: str) -> None:
        self.path = path
        # O_NOFOLLOW: the directory may be shared and world-writable, the name is predictable.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        found = os.fstat(self._fd).st_size
        try:
            size = max(found, _INITIAL_SIZE)
            reserve(self._fd, size)  # before mapping: no page of the map is ever left unbacked
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            if not found:
                os.remove(path)  # ours, still empty: an empty file would only break scrapes
            raise
        (used,) = _USED.unpack_from(self._map, 0)
        self._used = used if used >= _HEADER else _HEADER
        self._positions = dict(_scan(self._map, used)) if used >= _HEADER else {}
        if used < _HEADER:
            self._map[0:4] = _USED.pack(self._used)

    def keys(self) -> set[str]:
        return set(self._positions)

    def read(self, key: str) -> tuple[float, float]:
        position = self._positions.get(key)
        if position is None:
            return 0.0, 0.0
        value, timestamp = _VALUE.unpack_from(self._map, position)
        return value, timestamp

    def write(self, key: str, value: float, timestamp: float = 0.0) -> None:
        position = self._positions.get(key)
        if position is None:
            position = self._append(key)
        # One slice assignment, not pack_into: a reader must never see the value half written.
        self._map[position : position + 16] = _VALUE.pack(value, timestamp)

    def make_room(self, keys: Iterable[str]) -> None:
        """Grow now for the keys not in the file yet, so writing them cannot fail half way through."""
        needed = sum(_key_field(len(key.encode("utf-8"))) + 16 for key in set(keys) if key not in self._positions)
        self._grow(self._used + needed)

    def _grow(self, end: int) -> None:
        if end > len(self._map):
            size = len(self._map)
            while size < end:
                size *= 2
            reserve(self._fd, size)  # raises before anything is mapped or written when space is short
            self._map.close()
            self._map = mmap.mmap(self._fd, size)

    def _append(self, key: str) -> int:
        entry = _entry(key)
        end = self._used + len(entry)
        self._grow(end)
        self._map[self._used : end] = entry
        # The header moves last, so a reader sees either the old entries or all of the new one.
        self._map[0:4] = _USED.pack(end)
        self._used = end
        self._positions[key] = end - 16
        return end - 16

    def close(self) -> None:
        if self._fd >= 0:
            self._map.close()
            os.close(self._fd)
            self._fd = -1
