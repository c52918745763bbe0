"""A hostile image server on 127.0.0.1: one endpoint for each way a server can misbehave.

Used by the safety tests. Runs in a background thread of the calling process and keeps a
log of every request it answered, so a test can prove which URLs were (never) requested,
and of every answer the client cut off, so a test can prove that a client hung up.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from PIL import Image


def jpeg_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG", quality=90)
    return out.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` pixels, in a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    row = b"\x00" + b"\x00" * 64
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b"")


class HostileServer:
    """``with HostileServer() as s: s.url("/trickle.jpg")``.

    ``s.requests`` counts requests by path, ``s.requests_by_url`` by path and query,
    ``s.hung_up`` the answers by path that the client cut off before their end.
    """

    def __init__(
        self, *, trickle_seconds: float = 60.0, oversized_bytes: int = 8 * 1024 * 1024, stall_seconds: float = 5.0
    ) -> None:
        self.trickle_seconds = trickle_seconds
        self.stall_seconds = stall_seconds
        self.oversized_bytes = oversized_bytes
        self.requests: Counter[str] = Counter()
        self.requests_by_url: Counter[str] = Counter()
        self.hung_up: Counter[str] = Counter()
        self.redirect_target = ""
        self.good = jpeg_bytes()
        self.busy_until = 0.0  # /busy.jpg answers 429 until then (time.monotonic())
        self._lock = threading.Lock()
        self._hung_up_changed = threading.Condition(self._lock)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "HostileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for_hang_up(self, path: str, *, more_than: int = 0, timeout: float = 60.0) -> bool:
        """Whether the client cuts off more than ``more_than`` answers on ``path`` within ``timeout`` s."""
        with self._hung_up_changed:
            return self._hung_up_changed.wait_for(lambda: self.hung_up[path] > more_than, timeout)

    def _hang_up(self, path: str) -> None:
        with self._hung_up_changed:
            self.hung_up[path] += 1
            self._hung_up_changed.notify_all()

    def _count(self, path: str, full: str) -> int:
        with self._lock:
            self.requests_by_url[full] += 1
            self.requests[path] += 1
            return self.requests[path]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                seen = server._count(path, self.path)
                route: Callable[[int], None] | None = ROUTES.get(path)
                try:
                    if route is None:
                        self.reply(404, b"not found", "text/plain")
                    else:
                        route(self, seen)
                except (BrokenPipeError, ConnectionResetError):
                    server._hang_up(path)

            def reply(self, status: int, body: bytes, content_type: str = "image/jpeg", headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def good(self, seen: int) -> None:
                self.reply(200, server.good)

            def trickle(self, seen: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                stop = time.monotonic() + server.trickle_seconds
                while time.monotonic() < stop:
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(1.0)

            def endless(self, seen: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                block = b"\xff" * 65536
                for _ in range(100_000):  # ~6.5 GB: for ever, as far as a client can tell
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))

            def bomb(self, seen: int) -> None:
                self.reply(200, bomb_png(), "image/png")

            def oversized(self, seen: int) -> None:
                self.reply(200, server.good + b"\x00" * server.oversized_bytes)

            def html(self, seen: int) -> None:
                self.reply(200, b"<!DOCTYPE html><html><body>not an image</body></html>", "image/jpeg")

            def truncated(self, seen: int) -> None:
                self.reply(200, server.good[:300])

            def zero(self, seen: int) -> None:
                self.reply(200, b"")

            def loop(self, seen: int) -> None:
                self.reply(302, b"", "text/plain", {"Location": "/loop"})

            def elsewhere(self, seen: int) -> None:
                self.reply(302, b"", "text/plain", {"Location": server.redirect_target})

            def metadata(self, seen: int) -> None:
                self.reply(302, b"", "text/plain", {"Location": "http://169.254.169.254/latest/meta-data/"})

            def busy(self, seen: int) -> None:
                # As a real rate limiter: a retry sooner than Retry-After is refused again.
                if seen == 1:
                    server.busy_until = time.monotonic() + 1
                if seen == 1 or time.monotonic() < server.busy_until:
                    self.reply(429, b"slow down", "text/plain", {"Retry-After": "1"})
                else:
                    self.reply(200, server.good)

            def noai(self, seen: int) -> None:
                self.reply(200, server.good, headers={"X-Robots-Tag": "noai"})

            # Transient failures: the first request for each URL (path and query) fails.
            def first_try(self) -> bool:
                return server.requests_by_url[self.path] == 1

            def flaky(self, seen: int) -> None:
                if self.first_try():
                    self.reply(503, b"try again later", "text/plain")
                else:
                    self.reply(200, server.good)

            def reset(self, seen: int) -> None:
                if self.first_try():
                    self.close_connection = True  # hang up without an answer
                else:
                    self.reply(200, server.good)

            def stall(self, seen: int) -> None:
                if self.first_try():
                    time.sleep(server.stall_seconds)
                self.reply(200, server.good)

            def forbidden(self, seen: int) -> None:
                self.reply(403, b"forbidden", "text/plain")

        ROUTES = {
            "/good.jpg": Handler.good,
            "/trickle.jpg": Handler.trickle,
            "/endless.jpg": Handler.endless,
            "/bomb.png": Handler.bomb,
            "/oversized.jpg": Handler.oversized,
            "/html.jpg": Handler.html,
            "/truncated.jpg": Handler.truncated,
            "/zero.jpg": Handler.zero,
            "/loop": Handler.loop,
            "/elsewhere": Handler.elsewhere,
            "/metadata": Handler.metadata,
            "/busy.jpg": Handler.busy,
            "/noai.jpg": Handler.noai,
            "/flaky.jpg": Handler.flaky,
            "/reset.jpg": Handler.reset,
            "/stall.jpg": Handler.stall,
            "/forbidden.jpg": Handler.forbidden,
        }
        return Handler


# Answers that do not end within any bound of the guard: a client must hang up on them.
UNENDING = ("/trickle.jpg", "/endless.jpg")

# What each endpoint must come to, through the pipeline's download stage.
EXPECTED_REASONS = {
    "/good.jpg": None,
    "/trickle.jpg": "download_time_limit",
    "/endless.jpg": "body_too_large",
    "/bomb.png": "decompression_bomb",
    "/oversized.jpg": "body_too_large",
    "/html.jpg": "html_body",
    "/zero.jpg": "empty_body",
    "/loop": "too_many_redirects",
    "/metadata": "refused_private_address",
    "/busy.jpg": None,
    "/noai.jpg": "robots_disallowed",
    "/missing.jpg": "http_404",
}
