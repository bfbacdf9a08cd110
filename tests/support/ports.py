"""Free TCP ports on 127.0.0.1 for the servers a test starts (Ray heads, tansu).

A port the kernel hands out for ``bind(0)`` comes from the ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``, 32768-60999 here), the same range
every outgoing connection and every ``bind(0)`` of the running Ray takes its
local port from. Between our check and the server's own bind, one of those can
take it: a CI run lost a test head that way (its Ray client server: "Failed to
bind to address 127.0.0.1:44911 ... Address already in use"). So ports are
picked below the ephemeral range, where nothing binds unless asked to, checked
free, and never handed out twice by this process.
"""

from __future__ import annotations

import random
import socket

_LOW, _HIGH = 20_000, 32_000
_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A port below the ephemeral range, free on 127.0.0.1 now, not given before."""
    high = min(_HIGH, _ephemeral_low())
    for _ in range(200):
        port = random.randrange(_LOW, high)
        if port in _given:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {_LOW}-{high}")
