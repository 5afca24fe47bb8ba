"""The replica's own HTTP server: uvicorn (uvloop + httptools) on a thread of the replica.

Serve's proxy, and even its direct-ingress mode, add a per-request cost that on a small
machine is several times the model's (benchmarks/README.md). So each replica answers HTTP
itself, on a socket bound with SO_REUSEPORT: every replica on a node listens on the same
port and the kernel spreads connections over them. Serve still owns the replicas (placement,
config, health checks, scaling, reconfiguration); only the request path skips it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

log = logging.getLogger(__name__)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other replicas on this node can bind too (Linux balances new
    connections across them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({exc.strerror}): another program holds the "
            "port; choose another with http.port"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class ReplicaHttpServer:
    """`app` (an ASGI app) served on host:port from a daemon thread with its own event loop."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        self.host, self.port = host, port
        self._socket = reuseport_socket(host, port)
        config = uvicorn.Config(
            app,
            loop="none",  # the thread's loop is made below (uvloop when installed)
            http="httptools",
            access_log=False,
            log_level="warning",
            timeout_keep_alive=30,
            lifespan="off",
            ws="none",  # HTTP only: a websocket upgrade is refused by uvicorn itself
            # No proxy in front to trust: skip the middleware that rewrites client addresses
            # from X-Forwarded-* headers on every request.
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="dlpipe-http", daemon=True)
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop comes with ray[serve]
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._server.serve(sockets=[self._socket]))
        except BaseException as exc:  # reported by check_health, not lost in a thread
            self._failure = exc
            log.exception("the HTTP server on %s:%d stopped", self.host, self.port)
        finally:
            loop.close()

    def check(self) -> None:
        """Raise if the server thread is gone (Serve then replaces the replica)."""
        if not self._thread.is_alive():
            raise RuntimeError(
                f"the HTTP server on {self.host}:{self.port} stopped: {self._failure}"
            )

    def stop_listening(self, timeout_s: float = 5.0) -> None:
        """Close the port, keep serving the connections already open: new connections go to
        the other replicas listening on it (or are refused when none is left). Done first
        when a replica stops, while its clients' connections are open and few new ones
        arrive: a connection the kernel has queued but the server not yet taken is reset
        when the port closes."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self._thread.is_alive():
            return
        closed = threading.Event()

        def close() -> None:
            for server in getattr(self._server, "servers", []):
                server.close()  # the listening socket only; open connections stay
            closed.set()

        try:
            loop.call_soon_threadsafe(close)
        except RuntimeError:  # the loop closed meanwhile: the server is gone already
            return
        closed.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to `timeout_s`), close."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._socket.close()
