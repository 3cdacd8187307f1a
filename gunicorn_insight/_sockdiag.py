"""The Linux netlink sock_diag protocol's framing, for the readers that ask the kernel about sockets: the
master's listen queues and unix socket files (_master.backlog) and TIME_WAIT per listener (_timewait)."""

from __future__ import annotations

import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
RTATTR = struct.Struct("=HH")  # length, type


def request(body: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    """One SOCK_DIAG_BY_FAMILY request message carrying ``body``."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + body
