"""A quiet, threaded static HTTP server for the sample web, bound to 127.0.0.1 only.

Run as its own process::

    python -m sampleweb.serve --dir DIR --port 0 --port-file FILE [--log FILE]

or from Python with `SampleWebServer`, which starts that process and stops it again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TextIO

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


class _StaticHandler(SimpleHTTPRequestHandler):
    """Serves files from the server's directory; logs each request as one JSON line."""

    server: SampleWebHTTPServer
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.server.record_request(self.command, self.path, int(code) if code != "-" else None)

    def log_message(self, format: str, *args: object) -> None:
        """Silence the stock per-request lines on stderr."""


class SampleWebHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer for a directory with an optional JSON-lines request log."""

    daemon_threads = True
    request_queue_size = 256  # many parallel downloaders connect at once

    def __init__(self, directory: Path, port: int = 0, request_log: TextIO | None = None) -> None:
        super().__init__((HOST, port), partial(_StaticHandler, directory=str(directory)))
        self._request_log = request_log
        self._log_lock = threading.Lock()

    def record_request(self, method: str | None, path: str, status: int | None) -> None:
        """Append one JSON line per request to the log, flushed at once."""
        if self._request_log is None:
            return
        line = json.dumps({"time": round(time.time(), 3), "method": method, "path": path, "status": status})
        with self._log_lock:
            self._request_log.write(line + "\n")
            self._request_log.flush()

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):  # a client hung up mid-transfer: normal for downloaders
            logger.debug("Client %s disconnected: %s", client_address, error)
        else:
            logger.exception("Request from %s failed", client_address)


def serve(directory: Path, port: int, port_file: Path, log_path: Path | None = None) -> None:
    """Serve `directory` until SIGTERM/SIGINT; write the bound port to `port_file` once listening."""
    if not directory.is_dir():
        raise FileNotFoundError(f"sample web directory {directory} does not exist; build it first")
    request_log = open(log_path, "a", encoding="utf-8") if log_path else None
    try:
        with SampleWebHTTPServer(directory, port, request_log) as server:
            # Write then rename, so a reader never sees a half-written port number.
            partial_file = port_file.with_name(port_file.name + ".tmp")
            partial_file.write_text(str(server.server_address[1]))
            os.replace(partial_file, port_file)
            logger.info("Serving %s on http://%s:%s", directory, HOST, server.server_address[1])
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                logger.info("Interrupted; stopping")
    finally:
        if request_log is not None:
            request_log.close()


class SampleWebServer:
    """Runs `python -m sampleweb.serve` for `www_dir` in a subprocess for a `with` block.

    >>> with SampleWebServer(root / "www") as srv:
    ...     srv.url  # 'http://127.0.0.1:PORT'
    """

    def __init__(self, www_dir: Path, log_path: Path | None = None, *, start_timeout: float = 15.0) -> None:
        self.www_dir = Path(www_dir)
        self.log_path = Path(log_path) if log_path is not None else None
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the sample web server is not running; use it inside a `with` block")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:41234 (no trailing slash)."""
        return f"http://{HOST}:{self.port}"

    def logged_requests(self) -> list[dict]:
        """The request log so far, one dict per request (needs `log_path`)."""
        if self.log_path is None:
            raise RuntimeError("this SampleWebServer was started without log_path")
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text(encoding="utf-8").splitlines()]

    def __enter__(self) -> SampleWebServer:
        self._scratch = tempfile.TemporaryDirectory(prefix="sampleweb-")
        scratch = Path(self._scratch.name)
        port_file, stderr_path = scratch / "port", scratch / "stderr.txt"
        command = [sys.executable, "-m", "sampleweb.serve", "--dir", str(self.www_dir),
                   "--port", "0", "--port-file", str(port_file)]
        if self.log_path is not None:
            command += ["--log", str(self.log_path)]
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
        with open(stderr_path, "wb") as stderr:
            self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.monotonic() + self.start_timeout
        while not port_file.exists():
            if self._process.poll() is not None:
                message = stderr_path.read_text(errors="replace").strip()
                self._stop()
                raise RuntimeError(f"sample web server exited with code {self._process.returncode}: {message}")
            if time.monotonic() > deadline:
                self._stop()
                raise TimeoutError(
                    f"sample web server for {self.www_dir} wrote no port file within {self.start_timeout} s"
                )
            time.sleep(0.02)
        self._port = int(port_file.read_text())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
        self._port = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sampleweb.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="directory to serve (a sample web's www/)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one")
    parser.add_argument("--port-file", type=Path, required=True, help="file to write the bound port to")
    parser.add_argument("--log", type=Path, default=None, help="append one JSON line per request here")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a directory; build the sample web first")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    serve(args.dir, args.port, args.port_file, args.log)


if __name__ == "__main__":
    main()
