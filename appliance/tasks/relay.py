"""The relay inside a job's sandbox: 127.0.0.1:11434 to the inference socket bind-mounted for it.

The sandbox runs this file with the system's ``/usr/bin/python3`` before the job's own program
(so it imports the standard library only). It binds the port, then forks: the parent exits 0 once
the port listens, so the job starts only when its calls can connect; the child relays each
connection's bytes both ways until either side closes. It dies with the job (the kernel ends every
process of the job's PID namespace when its PID 1 ends).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from contextlib import suppress

SOCKET = "/run/appliance/inference.sock"
ADDRESS = ("127.0.0.1", 11434)


def _pump(source: socket.socket, target: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    with suppress(OSError):  # pass the end on, so the other side sees it too
        target.shutdown(socket.SHUT_WR)


def _relay(client: socket.socket) -> None:
    with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream:
        try:
            upstream.connect(SOCKET)
        except OSError as exc:
            print(f"inference relay: cannot reach {SOCKET}: {exc}", file=sys.stderr)
            return
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()


def main() -> None:
    listener = socket.create_server(ADDRESS, backlog=64)
    if os.fork():
        os._exit(0)  # the port listens: the job may start
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_relay, args=(client,), daemon=True).start()


if __name__ == "__main__":
    main()
