from collections.abc import Callable
from typing import Any

def pre_request(worker: Any, req: Any, /) -> None: ...
def post_request(worker: Any, req: Any, environ: Any, resp: Any, /) -> None: ...
def bind(
    globals: dict[str, Any],
    pre_request: Callable[[Any, Any], None],
    post_request: Callable[[Any, Any, Any, Any], None],
    report: Callable[[str, BaseException], None],
    describe_peer: Callable[[Any], bytes],
    parse_status: Callable[[Any], int],
    parse_request_start: Callable[[str, float], float],
    queue_header: Callable[[Any], str | None],
    method_index: dict[str, int],
    other_method: int,
    route_key: str,
    request_start_key: str,
    queue_start_key: str,
    hang_up_check_after: float,
    layouts: tuple[str, str, str, int],
    /,
) -> None: ...

class Recording:
    """One HTTP request through the recording ASGI layer (asgi.py): the hooks' request and response."""

    method: str
    path: str
    query: str
    peer_addr: Any
    status_code: Any
    sock: None
    # in in_flight, it reads as recorder.InFlightRequest: (start, entry, current, method, path, CPU clock)
    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> Any: ...
    def finish(self) -> None: ...

def asgi_start(worker: Any, scope: Any, send: Any, routes: bool, /) -> Recording: ...
def note(recording: Recording, message: Any, /) -> Any: ...
def bind_asgi(
    route_template: Callable[[Any, str], str | None],
    queue_stamp: Callable[[Any], Any],
    running_loop: Callable[[], Any],
    task_of_loop: Any,
    thread_ident: Callable[[], int],
    sender: Callable[[Any, Any], Any],
    /,
) -> None: ...
def current_task() -> Any: ...

class Entry:
    """The recording ASGI layer's per-request path (asgi.RecordingApp.entry): what the server calls."""

    def __init__(self, layer: Any, worker: Any, app: Any, routes: bool, /) -> None: ...
    def __call__(self, scope: Any, receive: Any, send: Any, /) -> Any: ...
    def __getattr__(self, name: str) -> Any: ...
