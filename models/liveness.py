"""A rank that dies ends every other rank at once, with one line naming it.

MLX's ring backend fails a collective that is in flight when a peer's socket closes, but a collective
issued after that waits forever (mlx 0.32.4: a prefill's next layer, or an `.item()` on its output, hangs).
So each group keeps its own TCP star beside MLX's: rank 0 listens on its address from the launcher's
hostfile (ring) or JACCL coordinator, the other ranks connect.  A socket that closes without a "bye" line
(the OS closes it when its process dies, however) makes rank 0 tell every other rank which rank ended,
and each exits with status 1.  A rank that finishes its command says "bye" first (`finish`).
A rank that stalls with its sockets open is `watchdog.Watchdog`'s case.  Under MPI there is no address
to listen on: only the watchdog applies.
"""

import json
import os
import socket
import sys
import threading
from pathlib import Path

CONNECT_TIMEOUT = 60.0  # seconds rank 0 waits for the others to connect
_state = {"socks": [], "done": False}


def _rank0_host() -> str | None:
    """Rank 0's address as the launcher gave it (ring hostfile or JACCL coordinator), or None."""
    coordinator = os.environ.get("MLX_JACCL_COORDINATOR")
    if coordinator:
        return coordinator.rsplit(":", 1)[0]
    hostfile = os.environ.get("MLX_HOSTFILE")
    if not hostfile:
        return None
    try:
        hosts = json.loads(Path(hostfile).read_text())
        return hosts[0][0].rsplit(":", 1)[0]
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):
        return None


def _end(me: int, n: int, dead: int):
    if _state["done"]:
        return
    prog = Path(sys.argv[0]).name or "tq-mlx"
    print(
        f"{prog} (rank {me} of {n}): the process of rank {dead} ended (killed, crashed, or its host went away) "
        "while the group was working; every rank stops",
        file=sys.__stderr__,
        flush=True,
    )
    os._exit(1)


def _send(sock, line: str):
    try:
        sock.sendall(line.encode() + b"\n")
    except OSError:
        pass


def _listen(sock, me: int, n: int, peer: int):
    """Read peer's lines until it says bye (or, on a rank other than 0, rank 0 names a lost rank)."""
    buf = b""
    while True:
        try:
            data = sock.recv(256)
        except OSError:
            data = b""
        if not data:
            break
        buf += data
        lines = buf.split(b"\n")
        buf = lines.pop()
        for line in lines:
            if line == b"bye":
                return
            if line.startswith(b"lost "):
                _end(me, n, int(line.split()[1]))
    if me == 0:
        for other in _state["socks"]:
            if other is not sock:
                _send(other, f"lost {peer}")
    _end(me, n, peer)


def start(group, share):
    """Connect this rank to the group's star (every rank must call it; `share(obj, group)` broadcasts rank
    0's object).  Returns False where the launcher gave no address (the watchdog is then the only guard)."""
    me, n = group.rank(), group.size()
    host = _rank0_host()
    listener = None
    if me == 0 and host is not None:
        try:
            listener = socket.create_server((host, 0))
        except OSError:
            listener = None
    port = share(listener.getsockname()[1] if listener is not None else None, group)
    if port is None:
        return False
    if me == 0:
        listener.settimeout(CONNECT_TIMEOUT)
        peers = {}
        for _ in range(n - 1):
            conn, _ = listener.accept()
            conn.settimeout(None)
            peers[int(conn.recv(16).split(b"\n")[0])] = conn
        listener.close()
    else:
        conn = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        conn.settimeout(None)
        conn.sendall(f"{me}\n".encode())
        peers = {0: conn}
    _state["socks"] = list(peers.values())
    for peer, sock in peers.items():
        threading.Thread(target=_listen, args=(sock, me, n, peer), name="tq-liveness", daemon=True).start()
    return True


def finish():
    """This rank is done: say bye to the peers, so that its exit ends nobody."""
    _state["done"] = True
    for sock in _state["socks"]:
        _send(sock, "bye")
        try:
            sock.close()
        except OSError:
            pass
    _state["socks"] = []
