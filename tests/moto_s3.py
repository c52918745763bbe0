"""An empty bucket on a moto S3 server on loopback (moto's server mode, as s3fs tests itself),
as fsspec's default s3 store for the test."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Iterator

import fsspec
import pytest


@contextmanager
def moto_bucket(monkeypatch: pytest.MonkeyPatch, bucket: str) -> Iterator[str]:
    """Yields ``bucket``, created on a fresh server; the server stops afterwards."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    config = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setitem(fsspec.config.conf, "s3", config)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    fsspec.filesystem("s3").mkdir(bucket)
    try:
        yield bucket
    finally:
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        server.stop()
