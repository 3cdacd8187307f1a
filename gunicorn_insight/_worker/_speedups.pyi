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
