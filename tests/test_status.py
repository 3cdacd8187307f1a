"""The run files' contracts: what the master writes is what every reader decodes, and nothing else is."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fakes import server_info, status_record

from gunicorn_insight._facts import Round
from gunicorn_insight._runfiles import (
    SERVER_FILE,
    SERVER_FORMAT,
    STATUS_FILE,
    STATUS_FORMAT,
    ContractError,
    Growth,
    HeldMemory,
    Listener,
    ServerInfo,
    StatusFiles,
    StatusRecord,
    WorkerExit,
    decode,
    encode,
    read_record,
)


def test_server_json_reads_back_as_written(tmp_path: Path) -> None:
    """The master's server.json decodes to an equal ServerInfo, format number first in the file."""
    info = server_info("/dev/shm/x/scoreboard", pidfile="/run/app.pid", prometheus_dir="/tmp/p", statsd="x")
    StatusFiles(str(tmp_path)).write_server(info)
    raw = json.loads((tmp_path / SERVER_FILE).read_text())
    assert next(iter(raw.items())) == ("format", SERVER_FORMAT)
    assert read_record(ServerInfo, str(tmp_path / SERVER_FILE)) == info


def test_status_json_reads_back_as_written(tmp_path: Path) -> None:
    """A round and two recorded exits decode to the StatusRecord the master meant, exits oldest first."""
    files = StatusFiles(str(tmp_path))
    files.record_exit(
        pid=11, slot=0, cause="timeout", detail="d", uptime=6.5, served=1, rss=0, request="GET /x", elapsed=3.0
    )
    files.record_exit(
        pid=12, slot=1, cause="graceful", detail="", uptime=1.0, served=0, rss=5, request=None, elapsed=None
    )
    facts = Round(
        workers=2,
        busy_workers=1,
        capacity=2,
        in_flight=1,
        waiting=0,
        connections={0: 1, 1: 2},
        listeners={"http://127.0.0.1:8000": (3, 2048)},
        listen_overflows=4,
        lost=0,
        at=123.5,
    )
    files.write_round(facts)
    status = read_record(StatusRecord, str(tmp_path / STATUS_FILE))
    assert (status.workers, status.capacity, status.connections, status.monotonic) == (2, 2, 3, 123.5)
    assert status.listeners == (Listener("http://127.0.0.1:8000", 3, 2048),)
    assert status.listen_overflows == 4
    assert [(item.pid, item.request) for item in status.recent_exits] == [(11, "GET /x"), (12, None)]
    assert isinstance(status.recent_exits[0], WorkerExit)


def test_encode_writes_what_dataclasses_asdict_writes() -> None:
    """encode's own conversion writes the JSON asdict gave, nested records, tuples, dicts and None included."""
    record = status_record(
        listeners=(Listener("http://127.0.0.1:8000", 3, 2048, 12), Listener("unix:/run/app.sock", None, None)),
        recent_exits=(WorkerExit(1.5, 11, 0, "timeout", "SIGABRT", 3.0, 7, 1 << 20, "GET /x", 30.5),),
        held_memory=(HeldMemory(0, 11, 4 << 20, 50 << 20, 1, 9, 120, 0.99, 1.5),),
        growth=(Growth(1, 12, "open_fds", 10, 1010, 1000, 1000.0, "files 990"),),
        host={"pressure": {"cpu": [0.5, 1.0]}, "cgroup": None, "limits": (1, 2)},
        stalled_since=12.25,
    )
    expected = {"format": STATUS_FORMAT, **dataclasses.asdict(record)}
    assert json.dumps(encode(record)) == json.dumps(expected)
    info = server_info("/s", binds=("127.0.0.1:8000", "unix:/run/app.sock"))
    assert json.dumps(encode(info)) == json.dumps({"format": SERVER_FORMAT, **dataclasses.asdict(info)})


def as_json(record: ServerInfo | StatusRecord) -> dict[str, Any]:
    """The record as a reader finds it in its file."""
    raw: dict[str, Any] = json.loads(json.dumps(encode(record)))
    return raw


def raw_server(**changes: Any) -> dict[str, Any]:
    return {**as_json(server_info("/s")), **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"format": SERVER_FORMAT + 1},
            re.escape(f"is format {SERVER_FORMAT + 1}, written by a newer gunicorn-insight (0.1.0); this"),
        ),
        ({"format": SERVER_FORMAT - 1}, re.escape("written by an older gunicorn-insight (0.1.0); ")),
        ({"format": None}, "has no format number: it was not written by gunicorn-insight"),
        ({"master_pid": True}, "master_pid is True, not int"),
        ({"started": "yesterday"}, "started is 'yesterday', not float"),
        ({"binds": "127.0.0.1:8000"}, "binds is '127.0.0.1:8000', not a list"),
        ({"binds": [8000]}, r"binds\[0\] is 8000, not str"),
        ({"pidfile": 3}, "pidfile is 3, not str"),
    ],
)
def test_a_record_this_version_cannot_read_is_refused_with_the_reason(changes: dict[str, Any], message: str) -> None:
    """Another format, or a field of the wrong type, is a ContractError naming the file, the field and the value."""
    with pytest.raises(ContractError, match=message):
        decode(ServerInfo, raw_server(**changes), "server.json")


def test_unknown_keys_are_ignored_and_ints_count_as_floats() -> None:
    """A writer of the same format may add keys; a float field written as a JSON integer is still a float."""
    info = decode(ServerInfo, raw_server(future_key=[1, 2], started=1700000000, interval=2), "server.json")
    assert (info.started, info.interval) == (1700000000.0, 2.0)
    assert isinstance(info.started, float)


def test_fields_added_within_the_format_read_from_an_older_writer() -> None:
    """status.json from a master of the same format without held_memory, growth and stalled_since reads as none
    measured; a field every writer of the format writes is still required."""
    raw = as_json(StatusRecord(1.0, 2.0, 1, 0, 0, 1, 0, 0, (), 0, 0, (), 1, 1, 0, 0, False, {}, 2, 0.0))
    del raw["held_memory"], raw["growth"], raw["stalled_since"]
    record = decode(StatusRecord, raw, "status.json")
    assert (record.held_memory, record.growth, record.stalled_since) == ((), (), None)
    del raw["rounds"]
    with pytest.raises(ContractError, match=r"status\.json has no field 'rounds'"):
        decode(StatusRecord, raw, "status.json")


def test_nested_records_name_the_path_to_a_bad_field() -> None:
    """A bad value inside a listener names the list index and the field."""
    raw = as_json(
        StatusRecord(1.0, 2.0, 1, 0, 0, 1, 0, 0, (Listener("l", 1, 2),), 0, 0, (), 1, 1, 0, 0, False, {}, 2, 0.0)
    )
    assert raw["format"] == STATUS_FORMAT
    raw["listeners"][0]["backlog"] = "many"
    with pytest.raises(ContractError, match=r"status.json: listeners\[0\]: backlog is 'many', not int"):
        decode(StatusRecord, raw, "status.json")


def test_a_file_that_is_not_json_is_a_contract_error(tmp_path: Path) -> None:
    """Garbage in a run file is a ContractError (a reader's 'cannot use it'), not a crash."""
    path = tmp_path / SERVER_FILE
    path.write_text("{not json")
    with pytest.raises(ContractError, match="is not JSON"):
        read_record(ServerInfo, str(path))
