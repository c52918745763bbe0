"""A static file server on 127.0.0.1 for the download benchmarks: nginx when installed.

nginx (Debian's ``nginx-light``, `make bench-deps`) serves thousands of small files a second
on one worker, so the downloaders, not the server, set the pace. Without it the sample
web's Python server stands in, and the results file says so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"

NGINX_CONF = """
worker_processes 1;
{user}
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 30;
  keepalive_requests 100000;
  types {{ image/jpeg jpg; }}
  default_type application/octet-stream;
  client_body_temp_path {run}/body;
  proxy_temp_path {run}/proxy;
  fastcgi_temp_path {run}/fastcgi;
  uwsgi_temp_path {run}/uwsgi;
  scgi_temp_path {run}/scgi;
  server {{ listen {host}:{port}; root {root}; }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_listening(port: int, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {seconds} s")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


@contextmanager
def static_server(root: Path, run_dir: Path) -> Iterator[tuple[str, str]]:
    """Serve ``root``; yields (base URL, server name)."""
    nginx = nginx_binary()
    if nginx is None:
        from sampleweb.serve import SampleWebServer

        with SampleWebServer(root) as server:
            yield server.url.rstrip("/"), "python-http.server (nginx not installed: make bench-deps)"
        return
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    conf = run_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, run=run_dir, host=HOST, port=port, root=root.resolve()))
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(run_dir), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            wait_listening(port)
        except RuntimeError:
            proc.terminate()
            raise RuntimeError(f"nginx did not start: {proc.communicate()[1].decode()[-2000:]}") from None
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
        yield f"http://{HOST}:{port}", version
    finally:
        proc.terminate()
        proc.wait(timeout=10)
