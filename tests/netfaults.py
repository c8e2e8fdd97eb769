"""A TCP proxy a test puts between credex and a service, to make the network fail on cue.

    with FaultyProxy("127.0.0.1", 5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
        ...
        proxy.mute_answers()  # the service's answers stop reaching the connections open now

Muting keeps every connection open and passes what the client sends (the broker stores the
messages), but swallows what comes back: publisher confirms that stop arriving, as a one-way
network partition makes them. Connections opened later pass both ways.

``cut()`` makes the service unreachable, as a host that went down: the connections open now are
reset and new ones are closed as soon as they arrive, until ``restore()``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class FaultyProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._closed = False
        self._down = threading.Event()
        self.refused = 0  # connections closed on arrival while cut
        self.swallowed = 0  # bytes of answers that never reached the client
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def mute_answers(self) -> int:
        """Swallow, from now on, everything the service sends on the connections open now.
        Returns how many connections were muted."""
        with self._lock:
            for _client, _server, muted in self._pairs:
                muted.set()
            return len(self._pairs)

    def cut(self) -> int:
        """The service is gone from now on: every open connection is reset, new ones are closed
        on arrival. Returns how many connections were open."""
        self._down.set()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, server, _muted in pairs:
            for end in (client, server):
                with contextlib.suppress(OSError):
                    end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                    end.close()
        return len(pairs)

    def restore(self) -> None:
        """The service is reachable again (for connections opened from now on)."""
        self._down.clear()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, server, _muted in pairs:
            for end in (client, server):
                with contextlib.suppress(OSError):
                    end.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down.is_set():
                self.refused += 1
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            muted = threading.Event()
            with self._lock:
                self._pairs.append((client, server, muted))
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, muted), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, muted: threading.Event | None) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if muted is not None and muted.is_set():
                    self.swallowed += len(data)
                    continue
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
