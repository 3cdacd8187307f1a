"""StatsD sink: line format, tags, batching within 1432 bytes, and no exception when the aggregator is away."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from gunicorn_insight._export import statsd as _statsd
from gunicorn_insight._export.statsd import MAX_DATAGRAM, StatsdSink
from gunicorn_insight._facts import NO_RESPONSE, Round


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    yield sock
    sock.close()


def datagrams(sock: socket.socket) -> list[bytes]:
    received = [sock.recv(65535)]
    sock.settimeout(0.2)
    try:
        while True:
            received.append(sock.recv(65535))
    except TimeoutError:
        return received


def sent_lines(receiver: socket.socket) -> list[str]:
    """The StatsD lines the socket's datagrams carried, in order."""
    return b"\n".join(datagrams(receiver)).decode().splitlines()


def published(receiver: socket.socket, facts: Round, **options: object) -> list[str]:
    """The lines a fresh sink sends for one round."""
    make_sink(receiver.getsockname(), **options).publish(facts)
    return sent_lines(receiver)


def a_round(requests: int = 3) -> Round:
    facts = Round(requests=Counter({("GET", 200, ""): requests, ("POST", 500, ""): 1}), workers=2, in_flight=1)
    facts.listeners = {"http://127.0.0.1:8000": (3, 128)}
    facts.durations = {("GET", ""): [0.25] * requests, ("POST", ""): [1.0]}
    facts.connections = {0: 1, 1: 0}
    return facts


def make_sink(address: tuple[str, int] | str, **options: object) -> StatsdSink:
    kwargs: dict[str, object] = {
        "prefix": "",
        "constant_tags": "",
        "tagged": False,
        "send_request_metrics": True,
        "connections_limit": 1,
    }
    kwargs.update(options)
    return StatsdSink(address, **kwargs)  # type: ignore[arg-type]


def test_lines_follow_gunicorn_names(receiver: socket.socket) -> None:
    """Counters per round, one timer line per request in ms, gauges, per-worker names with the slot."""
    lines = published(receiver, a_round(), prefix="app")
    assert "app.gunicorn.requests:4|c" in lines
    assert "app.gunicorn.request.status.200:3|c" in lines
    assert "app.gunicorn.request.status.500:1|c" in lines
    assert lines.count("app.gunicorn.request.duration:250.000|ms") == 3
    assert "app.gunicorn.request.duration:1000.000|ms" in lines
    assert "app.gunicorn.workers:2|g" in lines
    assert "app.gunicorn.requests_in_flight:1|g" in lines
    assert "app.gunicorn.connections:1|g" in lines
    assert "app.gunicorn.worker.0.connections:1|g" in lines
    assert "app.gunicorn.worker.1.connections:0|g" in lines
    assert "app.gunicorn.listener.http_127_0_0_1_8000.backlog:3|g" in lines  # one name level, no dots


def test_dogstatsd_tags_carry_the_worker(receiver: socket.socket) -> None:
    """With tags on, per-worker values share a name and differ by a worker tag; requests carry method/status
    tags; constant tags follow."""
    lines = published(receiver, a_round(), tagged=True, constant_tags="env:prod, team:web")
    assert "gunicorn.worker.connections:1|g|#worker:0,env:prod,team:web" in lines
    assert "gunicorn.listen_backlog:3|g|#listener:http_//127.0.0.1_8000,env:prod,team:web" in lines
    assert "gunicorn.requests:3|c|#method:GET,status:200,env:prod,team:web" in lines
    assert "gunicorn.request.duration:1000.000|ms|#method:POST,env:prod,team:web" in lines


def test_request_metrics_left_to_gunicorn_when_its_statsd_is_on(receiver: socket.socket) -> None:
    """When gunicorn's own statsd logger sends request metrics, ours does not send them a second time."""
    make_sink(receiver.getsockname(), send_request_metrics=False).publish(a_round())
    text = b"\n".join(datagrams(receiver)).decode()
    assert "gunicorn.requests:" not in text
    assert "gunicorn.request." not in text
    assert "gunicorn.workers:2|g" in text


def test_datagrams_never_exceed_the_mtu_budget(receiver: socket.socket) -> None:
    """Many lines are packed into datagrams of at most 1432 bytes, and none is lost."""
    make_sink(receiver.getsockname()).publish(a_round(requests=500))
    received = datagrams(receiver)
    assert len(received) > 1
    assert max(len(d) for d in received) <= MAX_DATAGRAM
    lines = b"\n".join(received).decode().splitlines()
    assert lines.count("gunicorn.request.duration:250.000|ms") == 500


def test_unix_datagram_socket(tmp_path: Path) -> None:
    """A path target sends datagrams to a unix socket (the statsd package only has stream sockets)."""
    path = str(tmp_path / "statsd.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2)
    make_sink(path).publish(a_round())
    assert b"gunicorn.requests:4|c" in server.recv(65535)
    server.close()


def test_unresolvable_host_warns_once_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    """A name that does not resolve costs one rate-limited warning, not an exception per round."""
    _statsd._WARN._last.clear()
    sink = make_sink(("no-such-host.invalid", 8125))
    with caplog.at_level(logging.WARNING, logger="gunicorn.error"):
        for _ in range(20):
            sink.publish(a_round())
    warnings = [r for r in caplog.records if "cannot reach StatsD" in r.getMessage()]
    assert len(warnings) == 1


def test_missing_unix_socket_is_counted_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Sending to a unix socket nobody listens on fails quietly (rate limited), and resumes when it appears."""
    _statsd._WARN._last.clear()
    path = str(tmp_path / "later.sock")
    sink = make_sink(path)
    with caplog.at_level(logging.WARNING, logger="gunicorn.error"):
        sink.publish(a_round())
        sink.publish(a_round())
    assert len([r for r in caplog.records if "StatsD send" in r.getMessage()]) == 1
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2)
    sink.publish(a_round())
    assert b"gunicorn.workers:2|g" in server.recv(65535)
    server.close()


def test_timers_past_the_cap_are_a_marked_sample_with_exact_count(receiver: socket.socket) -> None:
    """Over statsd_timers_per_second, a round sends that many values (fastest and slowest among them), each
    marked |@rate, so values / rate is exactly the number of requests."""
    facts = a_round(requests=0)
    facts.durations = {("GET", ""): [0.001 * n for n in range(1, 1000)], ("POST", ""): [9.0]}  # 1,000 requests
    facts.at = 100.0
    make_sink(receiver.getsockname(), timers_per_second=100, interval=0.5).publish(facts)
    lines = [line for line in b"\n".join(datagrams(receiver)).decode().splitlines() if "duration" in line]
    assert len(lines) == 50  # 100 a second, for a 0.5 s round
    assert all(line.endswith("|ms|@0.05") for line in lines)
    values = {line.split(":")[1].split("|")[0] for line in lines}
    assert {"1.000", "9000.000"} <= values
    assert len(lines) / 0.05 == 1000


def test_a_round_under_the_cap_sends_every_value_unmarked(receiver: socket.socket) -> None:
    """Below the cap (and with the cap off) every duration is sent, without a sample rate."""
    for cap in (0, 100):
        make_sink(receiver.getsockname(), timers_per_second=cap).publish(a_round(requests=3))
        lines = [line for line in b"\n".join(datagrams(receiver)).decode().splitlines() if "duration" in line]
        assert sorted(lines) == ["gunicorn.request.duration:1000.000|ms"] + ["gunicorn.request.duration:250.000|ms"] * 3


def test_the_cap_follows_the_length_of_the_round(receiver: socket.socket) -> None:
    """A round a scrape started early gets a smaller share of the per-second cap; tags keep the rate before them."""
    sink = make_sink(receiver.getsockname(), timers_per_second=100, tagged=True)
    for at in (10.0, 10.1):
        facts = a_round(requests=0)
        facts.durations = {("GET", ""): [0.01] * 400}
        facts.at = at
        sink.publish(facts)
        lines = [line for line in b"\n".join(datagrams(receiver)).decode().splitlines() if "duration" in line]
        assert len(lines) == (50 if at == 10.0 else 10)
        assert lines[0].endswith(f"|ms|@{len(lines) / 400:g}|#method:GET")


def test_utilization_is_busy_seconds_per_second_of_capacity(receiver: socket.socket) -> None:
    """gunicorn.utilization: busy request-seconds added since the previous round, over its length times
    capacity; 0 in the first round, which has no previous one."""
    sink = make_sink(receiver.getsockname())
    for at, busy, expected in ((10.0, 3.0, "0.0"), (10.5, 3.5, "0.5"), (11.5, 3.5, "0.0")):
        facts = a_round()
        facts.at, facts.capacity, facts.busy_seconds = at, 2, {0: busy}
        sink.publish(facts)
        lines = sent_lines(receiver)
        assert f"gunicorn.utilization:{expected}|g" in lines


def test_host_pressure_lines_send_what_the_kernel_counters_gained(receiver: socket.socket) -> None:
    """Kernel totals become StatsD counters of their increase per round; gauges as read; absent: no line."""
    from gunicorn_insight._facts import CpuThrottling, HostPressure

    sink = make_sink(receiver.getsockname())
    first = a_round()
    first.host = HostPressure(
        throttling=CpuThrottling(100, 10, 1.0), memory_usage=300, memory_limit=1000, pressure={("cpu", "some"): 2.0}
    )
    first.context_switches, first.swap = {0: (10, 1)}, {0: 4096}
    first.ready_workers, first.booting_workers, first.boot_durations = 1, 1, [0.5]
    sink.publish(first)
    datagrams(receiver)
    second = a_round()
    second.host = HostPressure(
        throttling=CpuThrottling(110, 14, 1.25), memory_usage=310, memory_limit=1000, pressure={("cpu", "some"): 2.5}
    )
    second.context_switches, second.swap = {0: (15, 1)}, {0: 0}
    second.stalls, second.stalled_requests, second.desired_workers = 1, 2, 3
    second.open_fds, second.fd_limits, second.master_loop_stuck = {0: 12}, {0: 1024}, 6.5
    second.threads = {0: 7}
    sink.publish(second)
    lines = sent_lines(receiver)
    for line in (
        "gunicorn.cgroup.cpu.periods:10|c",
        "gunicorn.cgroup.cpu.throttled_periods:4|c",
        "gunicorn.cgroup.cpu.throttled_ms:250|c",
        "gunicorn.cgroup.memory.usage:310|g",
        "gunicorn.cgroup.memory.limit:1000|g",
        "gunicorn.pressure.cpu.waiting_ms:500|c",
        "gunicorn.worker.0.context_switches.voluntary:5|c",
        "gunicorn.worker.0.swap:0|g",
        "gunicorn.stalls:1|c",
        "gunicorn.stalled_requests:2|g",
        "gunicorn.workers_desired:3|g",
        "gunicorn.master.loop_stuck_ms:6500|g",
        "gunicorn.worker.0.open_fds:12|g",
        "gunicorn.worker.0.max_fds:1024|g",
        "gunicorn.worker.0.threads:7|g",
    ):
        assert line in lines, line
    assert not [line for line in lines if "quota_cores" in line or "working_set" in line]
    assert "gunicorn.worker.0.context_switches.involuntary" not in "\n".join(lines)  # nothing gained


def test_publish_never_waits_for_a_hanging_lookup(receiver: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup that hangs runs in the resolver's thread: publish returns, drops the round and counts it."""
    answer = threading.Event()
    real_getaddrinfo = socket.getaddrinfo
    port = receiver.getsockname()[1]

    def slow_getaddrinfo(host: str, *args: object, **kwargs: object) -> object:
        if host == "statsd.example" and not kwargs.get("flags"):  # AI_NUMERICHOST never asks a server
            answer.wait(30)
            return real_getaddrinfo("127.0.0.1", port, type=socket.SOCK_DGRAM)
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]  # passes through the real types

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    sink = make_sink(("statsd.example", port))

    def publish_three() -> None:
        for _ in range(3):
            sink.publish(a_round())

    publisher = threading.Thread(target=publish_three)
    publisher.start()
    publisher.join(10)
    try:
        assert not publisher.is_alive(), "publish waited for the lookup"
        assert sink.dropped_rounds == 3
    finally:
        answer.set()
    assert sink.resolver is not None
    deadline = time.monotonic() + 10
    while sink.resolver.address is None and time.monotonic() < deadline:
        time.sleep(0.01)
    sink.publish(a_round())
    assert b"gunicorn.requests:4|c" in receiver.recv(65535)
    sink.close()


def test_last_good_address_is_kept_and_failures_back_off(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that stops resolving keeps its last address; failed lookups are retried 1, 2, 4... s apart."""
    port = receiver.getsockname()[1]
    waits: list[float] = []
    resolver = _statsd.Resolver("statsd.example", port)
    results: list[object] = [
        [(socket.AF_INET, socket.SOCK_DGRAM, 0, "", ("127.0.0.1", port))],
        OSError("no answer"),
        OSError("no answer"),
        OSError("no answer"),
    ]

    def scripted(*_args: object, **_kwargs: object) -> object:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    class Wake:
        def wait(self, seconds: float) -> bool:
            waits.append(seconds)
            return not results  # stop the loop when the script is done

    monkeypatch.setattr(socket, "getaddrinfo", scripted)
    resolver._run(Wake())  # type: ignore[arg-type]  # only wait() is used
    assert resolver.address == (socket.AF_INET, ("127.0.0.1", port))
    assert resolver.error == "no answer"
    assert waits == [_statsd.RESOLVE_EVERY, 1.0, 2.0, 4.0]


def test_requests_cut_short_by_a_death_are_sent_as_aborted(receiver: socket.socket) -> None:
    """A request whose worker died under it (status NO_RESPONSE) is status "aborted" in both modes, not 500."""
    facts = Round(requests=Counter({("GET", NO_RESPONSE, ""): 1}), durations={("GET", ""): [31.5]})
    lines = published(receiver, facts)
    assert "gunicorn.request.status.aborted:1|c" in lines
    assert "gunicorn.request.duration:31500.000|ms" in lines
    lines = published(receiver, facts, tagged=True)
    assert "gunicorn.requests:1|c|#method:GET,status:aborted" in lines


def test_client_hang_ups_are_sent_in_both_modes(receiver: socket.socket) -> None:
    """gunicorn.requests.client_closed: one total in plain mode, by method and route in DogStatsD mode."""
    facts = Round(
        requests=Counter({("GET", 200, "/report"): 3}),
        durations={("GET", "/report"): [1.0, 2.0, 3.0]},
        client_closed=Counter({("GET", "/report"): 2}),
    )
    lines = published(receiver, facts)
    assert "gunicorn.requests.client_closed:2|c" in lines
    lines = published(receiver, facts, tagged=True)
    assert "gunicorn.requests.client_closed:2|c|#method:GET,route:/report" in lines


def test_rejected_requests_time_wait_and_drops_in_both_modes(receiver: socket.socket) -> None:
    """Rejected requests are counters per reason, TIME_WAIT a gauge and drops a counter per listener (sent when
    some were dropped): dotted names, or tags."""
    facts = a_round()
    facts.rejected = Counter(framing=2)
    facts.time_wait = {"http://127.0.0.1:8000": 300}
    facts.listen_drops = {"http://127.0.0.1:8000": 4, "http://127.0.0.1:8001": 0}
    lines = published(receiver, facts)
    assert "gunicorn.request.rejected.framing:2|c" in lines
    assert "gunicorn.listener.http_127_0_0_1_8000.time_wait:300|g" in lines
    assert "gunicorn.listener.http_127_0_0_1_8000.drops:4|c" in lines
    assert not any("8001.drops" in line for line in lines)
    lines = published(receiver, facts, tagged=True)
    assert "gunicorn.request.rejected:2|c|#reason:framing" in lines
    assert "gunicorn.listen_time_wait:300|g|#listener:http_//127.0.0.1_8000" in lines
    assert "gunicorn.listen_drops:4|c|#listener:http_//127.0.0.1_8000" in lines


@pytest.mark.parametrize("tagged", [False, True], ids=["dotted", "tagged"])
def test_remembered_names_are_the_names_made_fresh_and_their_number_is_capped(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch, tagged: bool
) -> None:
    """A sink sends the same lines every round from the names it remembers, as a fresh sink makes them, and
    forgets them all past the cap rather than grow."""
    monkeypatch.setattr(_statsd, "_MAX_NAMES", 5)
    facts = a_round()
    facts.connections = {slot: slot for slot in range(8)}  # more per-slot names than the cap
    sink = make_sink(receiver.getsockname(), tagged=tagged, constant_tags="env:prod", prefix="app")
    sink.publish(facts)
    first = sent_lines(receiver)
    sink.publish(facts)
    assert (
        sent_lines(receiver)
        == first
        == published(receiver, facts, tagged=tagged, constant_tags="env:prod", prefix="app")
    )
    assert len(sink._names) <= 5
