"""A loopback TCP proxy that injects network faults between a client and a real server.

It forwards bytes unchanged (HTTP to Azurite, here) and can:
- `cut(seconds)`: close every open connection and refuse new ones for a while;
- `delay(seconds)`: hold every forwarded chunk for that long;
- `cut_on(pattern, seconds, nth)`: cut when the nth request containing `pattern` goes by;
- `lose_response_to(pattern)`: forward one matching request, let the server act on it, then
  drop the connection before the client sees the response (the "lost response" fault);
- `on_response_to(pattern, callback)`: the same, calling `callback()` when the server has
  answered (a test kills the client there: "killed between the server's commit and its reply").
"""

from __future__ import annotations

import socket
import struct
import threading
import time

CHUNK = 64 << 10


class TcpProxy:
    """A threaded proxy on 127.0.0.1 to `127.0.0.1:target_port`."""

    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        self.target = (host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._refuse_until = 0.0
        self._delay = 0.0
        self._cut_rules: list[dict] = []
        self._lose_rules: list[dict] = []
        self.requests = 0
        self.cuts = 0
        self.lost_responses = 0
        self.refused = 0
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name="proxy-accept").start()

    # -- controls ---------------------------------------------------------------------------
    def cut(self, seconds: float = 0.0) -> None:
        """Close all connections now; refuse new ones for `seconds`."""
        with self._lock:
            self._refuse_until = time.monotonic() + seconds
            conns, self._conns = list(self._conns), set()
            self.cuts += 1
        for s in conns:
            _close(s)

    def delay(self, seconds: float) -> None:
        """Hold every forwarded chunk for `seconds` (0 turns it off)."""
        self._delay = seconds

    def cut_on(self, pattern: bytes, seconds: float, nth: int = 1, method: bytes = b"") -> None:
        """Cut (for `seconds`) when the nth request (of `method`) containing `pattern` is seen."""
        with self._lock:
            self._cut_rules.append(
                {"pattern": pattern, "seconds": seconds, "left": nth, "method": method}
            )

    def lose_response_to(self, pattern: bytes, method: bytes = b"PUT", times: int = 1) -> None:
        """Forward the next `method` request containing `pattern`, then drop its response."""
        with self._lock:
            self._lose_rules.append({"pattern": pattern, "left": times, "method": method})

    def on_response_to(self, pattern: bytes, callback, method: bytes = b"POST") -> None:
        """Forward the next `method` request containing `pattern`; when the server has answered,
        call `callback()` and drop the response (the client never hears it)."""
        with self._lock:
            self._lose_rules.append(
                {"pattern": pattern, "left": 1, "method": method, "callback": callback}
            )

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.cut()

    # -- plumbing ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                self.refused += 1
                # RST instead of FIN: the client sees "connection reset", like a dead endpoint.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            state = {"lose": False}
            threading.Thread(
                target=self._pump, args=(client, upstream, state, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, state, False), daemon=True
            ).start()

    def _inspect(self, data: bytes, state: dict) -> bool:
        """Look at a client->server chunk; True when the connection must be cut now."""
        if data[:8].split(b" ", 1)[0] in (b"GET", b"PUT", b"POST", b"HEAD", b"DELETE", b"PATCH"):
            self.requests += 1
        cut = None
        with self._lock:
            for rule in self._lose_rules:
                if rule["left"] > 0 and _matches(rule, data):
                    rule["left"] -= 1
                    state["lose"] = True
                    state["callback"] = rule.get("callback")
                    break
            for rule in self._cut_rules:
                if rule["left"] > 0 and _matches(rule, data):
                    rule["left"] -= 1
                    if rule["left"] == 0:
                        cut = rule["seconds"]
                    break
        if cut is not None:
            self.cut(cut)
            return True
        return False

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                if upstream and self._inspect(data, state):
                    return
                if not upstream and state["lose"]:
                    # The server answered (so it acted on the request); the client never hears.
                    self.lost_responses += 1
                    state["lose"] = False
                    if state.get("callback") is not None:
                        state.pop("callback")()
                    break
                if self._delay:
                    time.sleep(self._delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            _close(src)
            _close(dst)


def _matches(rule: dict, data: bytes) -> bool:
    return data.startswith(rule["method"]) and rule["pattern"] in data


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
