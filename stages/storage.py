"""Artifact storage: every path the pipeline writes goes through fsspec.

A local path is the embedded default; ``s3://bucket/prefix`` (AWS, MinIO) takes its
credentials from an Airflow connection. Credentials are handed to fsspec through its own
configuration (``fsspec.config.conf`` and the ``FSSPEC_S3`` environment variable), so every
tool the tasks start -- img2dataset's worker processes, clip-retrieval, autofaiss,
spark-submit -- reads the store the same way without a secret on a command line.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

from stages.settings import setting

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StorageSettings:
    """Where a run's artifacts go, and the credentials for a remote store."""

    output_root: str = setting(
        str(REPO / "data" / "output"), env="LAION_OUTPUT_ROOT", type="string", minLength=1,
        description="Local path or s3://bucket/prefix; may hold {{ ds }} (one output per run date).",
    )  # fmt: skip
    storage_conn_id: str = setting(
        "laion_storage", env="LAION_STORAGE_CONN_ID", type="string", description="Airflow connection for s3:// output."
    )


def join(root: str, *parts: str) -> str:
    """Join path parts onto a local path or a URL."""
    if "://" in root:
        return posixpath.join(root.rstrip("/"), *parts)
    return os.path.join(root, *parts)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def s3_options_from_connection(conn: Any) -> dict[str, Any]:
    """fsspec/s3fs options from an Airflow ``aws`` connection (MinIO: extra endpoint_url)."""
    extra = conn.extra_dejson or {}
    options: dict[str, Any] = {}
    key = conn.login or extra.get("aws_access_key_id")
    secret = conn.password or extra.get("aws_secret_access_key")
    if key:
        options["key"] = key
    if secret:
        options["secret"] = secret
    client_kwargs: dict[str, Any] = {}
    endpoint = extra.get("endpoint_url") or (extra.get("service_config", {}).get("s3", {}) or {}).get(
        "endpoint_url"
    )
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if extra.get("region_name"):
        client_kwargs["region_name"] = extra["region_name"]
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def configure_s3(options: dict[str, Any]) -> None:
    """Make ``options`` the default for every s3:// access in this process and its children."""
    fsspec.config.conf["s3"] = dict(options)
    os.environ["FSSPEC_S3"] = json.dumps(options)
    # Instances cached before the change would keep the old credentials.
    fsspec.get_filesystem_class("s3").clear_instance_cache()


def configure_storage(output_root: str, conn_id: str | None) -> None:
    """Resolve the Airflow connection ``conn_id`` for ``output_root`` when it is on S3."""
    if not output_root.startswith(("s3://", "s3a://")) or not conn_id:
        return
    from airflow.sdk import BaseHook

    configure_s3(s3_options_from_connection(BaseHook.get_connection(conn_id)))


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def remove(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.rm(path)


def read_json(url: str) -> Any:
    with fsspec.open(url, "r") as f:
        return json.load(f)


def read_json_or_none(url: str) -> Any:
    return read_json(url) if exists(url) else None


@contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[Any]:
    """Open ``url`` for writing so that readers never see a partial file.

    Local files are written to a hidden temporary name and renamed; on S3 a single PUT
    (or a multipart upload) only creates the object when it completes, so it is written
    in place.
    """
    fs, path = url_to_fs(url)
    if is_remote(url):
        with fs.open(path, mode) as f:
            yield f
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def copy(src: str, dst: str) -> None:
    """Copy one file between any two stores; ``dst`` appears only once complete."""
    src_fs, src_path = url_to_fs(src)
    with src_fs.open(src_path, "rb") as reader, atomic_open(dst, "wb") as writer:
        shutil.copyfileobj(reader, writer, length=8 << 20)


def write_json(url: str, value: Any) -> None:
    with atomic_open(url, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def write_text(url: str, text: str) -> None:
    with atomic_open(url, "w") as f:
        f.write(text)


def url_of(fs: Any, path: str, like: str) -> str:
    """A path that ``fs`` returned (fsspec strips the protocol) as a URL of the same kind as ``like``:
    ``s3://bucket/key`` for a remote ``like``, a plain local path otherwise."""
    if not is_remote(like):
        return path
    protocol = fs.protocol[0] if isinstance(fs.protocol, (list, tuple)) else fs.protocol
    return f"{protocol}://{path}"


def list_files(url: str, pattern: str = "*") -> list[str]:
    """Files directly under ``url`` matching ``pattern``, as full URLs or paths, sorted."""
    fs, path = url_to_fs(url)
    return sorted(url_of(fs, p, like=url) for p in fs.glob(posixpath.join(path.rstrip("/"), pattern)))


# A full device, or a user's disk quota used up: either way nothing more can be written there.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """The device holding a stage's output has no space left."""


@contextmanager
def disk_full_reported(output: str) -> Iterator[None]:
    """Within the block, a full disk raises :class:`DiskFullError` naming ``output``.

    The bare ``[Errno 28] No space left on device`` comes from deep inside a tool's writer
    and often names no file, or only a temporary one.
    """
    try:
        yield
    except DiskFullError:
        raise
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        writing = f" while writing {error.filename}" if error.filename else ""
        raise DiskFullError(
            error.errno,
            f"the disk holding {output} is full ({error.strerror}){writing}; free space there, "
            "or set output_root to another disk, and rerun: finished work is kept",
        ) from error
