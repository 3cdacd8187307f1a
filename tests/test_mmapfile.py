"""The multiprocess file format, checked in both directions against the installed prometheus_client."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.utils import floatToGoString

from gunicorn_insight._export.mmapfile import MetricFile, go_float, read_file, sample_key

# Key lengths around every remainder mod 8, so each padding width (1..8 bytes) is exercised.
KEYS = [sample_key("m", "m_total", {"k": "v" * n}, "help") for n in range(12)] + [
    sample_key("é", "é_total", {"path": "/ünïcode"}, "non-ASCII help")
]


def test_prometheus_client_reads_what_we_write(tmp_path: Path) -> None:
    """Every key, value and timestamp we write comes back unchanged through prometheus_client's reader."""
    path = str(tmp_path / "counter_1.db")
    ours = MetricFile(path)
    for number, key in enumerate(KEYS):
        ours.write(key, number * 1.5, number / 4)
    ours.write(KEYS[0], 42.0)  # overwrite in place, no second entry
    ours.close()
    theirs = {key: (value, timestamp) for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path)}
    assert theirs == {key: (42.0, 0.0) if n == 0 else (n * 1.5, n / 4) for n, key in enumerate(KEYS)}


def test_we_read_what_prometheus_client_writes(tmp_path: Path) -> None:
    """Files written by prometheus_client (the application's workers) read back identically."""
    path = str(tmp_path / "counter_2.db")
    theirs = MmapedDict(path)
    for number, key in enumerate(KEYS):
        theirs.write_value(key, float(number), 1700000000.0 + number)
    theirs.close()
    assert read_file(path) == [(key, float(n), 1700000000.0 + n) for n, key in enumerate(KEYS)]
    reopened = MetricFile(path)
    assert reopened.keys() == set(KEYS)
    assert reopened.read(KEYS[3]) == (3.0, 1700000003.0)


def test_file_grows_past_its_first_size_and_stays_readable(tmp_path: Path) -> None:
    """Thousands of keys outgrow the 64 KiB start; the file is extended and both readers see every key."""
    path = str(tmp_path / "gauge_livesum_3.db")
    ours = MetricFile(path)
    keys = [sample_key("g", "g", {"worker": str(n)}, "a gauge with a long help text " * 3) for n in range(2000)]
    for number, key in enumerate(keys):
        ours.write(key, float(number))
    assert os.path.getsize(path) > 1 << 16
    ours.close()
    assert [value for _, value, _, _ in MmapedDict.read_all_values_from_file(path)] == [float(n) for n in range(2000)]
    assert len(read_file(path)) == 2000


def test_sample_key_matches_prometheus_client() -> None:
    """Our keys are byte-identical to prometheus_client's, so a sample is one series, not two."""
    assert sample_key("h", "h_bucket", {"method": "GET", "le": "0.1"}, "doc") == mmap_key(
        "h", "h_bucket", ["method", "le"], ["GET", "0.1"], "doc"
    )


@pytest.mark.parametrize("value", [0.001, 0.005, 0.1, 0.25, 1.0, 2.5, 10.0, 60.0, 1234567.0, 1e7, 1.5e9, math.inf])
def test_bucket_bounds_are_formatted_like_prometheus_client(value: float) -> None:
    """The le label we write is the string prometheus_client would write for the same bound."""
    assert go_float(value) == floatToGoString(value)


def test_reader_rejects_an_entry_that_runs_past_the_used_size(tmp_path: Path) -> None:
    """A corrupt length is an error naming the position, not a read of garbage."""
    path = tmp_path / "counter_4.db"
    ours = MetricFile(str(path))
    ours.write(KEYS[0], 1.0)
    ours.close()
    data = bytearray(path.read_bytes())
    data[8:12] = (10_000).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="runs past"):
        read_file(str(path))


def test_empty_file_left_by_a_kill_reads_as_no_samples(tmp_path: Path) -> None:
    """A 0-byte file (the writer was killed before its header) has no samples rather than an error."""
    path = tmp_path / "counter_5.db"
    path.write_bytes(b"")
    assert read_file(str(path)) == []
