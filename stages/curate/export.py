"""The curated subset as webdataset: the kept samples (or an allowlist's) as new shards.

A source shard ``images/<part>/<shard>.tar`` with any selected sample becomes
``subset/<shard>.tar`` holding every file of each selected sample (``.jpg``, ``.txt``,
``.json`` and anything else under its key) byte for byte, with ``<shard>.parquet`` (the
source parquet's rows of those samples) and ``<shard>_stats.json``. The stats file is
written last and records a fingerprint of the shard's selection and the source tar's size:
a rerun skips every shard whose selection is unchanged, rewrites the others and removes
the outputs of shards that no longer keep a sample. ``subset/_SUCCESS.json`` marks the
whole subset; it is taken away before the first change and written again at the end.

The selection is the curation's decisions (``reason`` null = kept), read one part at a
time, or a ``subset_keys`` allowlist (one key per line; held in memory as a set).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import tarfile
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from stages import storage
from stages.errors import InputError, StageNotFinished
from stages.layout import SHARD_STATS_SUFFIX, Marker, RunLayout, shard_location
from stages.settings import setting

BLOCKED_REASONS = ("blocked_url", "blocked_image")  # the decisions' reasons of samples a hash list names

log = logging.getLogger(__name__)

CURATION = "curation"
ALLOWLIST = "allowlist"
SUFFIXES = (SHARD_STATS_SUFFIX, ".tar", ".parquet")  # a subset shard's files; _stats.json first: it names the shard


@dataclass(frozen=True)
class ExportSettings:
    """What the subset export writes, and how many source shards it reads at once."""

    subset_keys: str | None = setting(
        None, type=["null", "string"],
        description="A file of sample keys, one per line (local, s3:// or http(s)://): the subset is these samples. "
        "Null: the curation's kept samples.",
    )  # fmt: skip
    export_workers: int = setting(
        4, env="LAION_EXPORT_WORKERS", type="integer", minimum=1, maximum=256,
        description="Source shards copied into the subset at once (threads).",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not isinstance(self.export_workers, int) or self.export_workers < 1:
            raise ValueError(f"export_workers = {self.export_workers!r}: expected an integer of at least 1")
        if self.subset_keys is not None and not str(self.subset_keys).strip():
            raise ValueError("subset_keys is an empty string: give a file of keys, or null for the curation's kept samples")


@dataclass
class Selection:
    """Which samples the subset holds; counts filled in while its shards are listed."""

    selected_by: str
    subset_keys: str | None = None
    selected: int = 0  # keys selected (kept decisions, or distinct allowlist keys)


def export_subset(layout: RunLayout, settings: ExportSettings) -> dict[str, Any]:
    """Write the subset under ``layout.subset``; returns its numbers (also in ``subset/_SUCCESS.json``)."""
    allowlist = read_allowlist(settings.subset_keys) if settings.subset_keys else None  # a bad list fails first
    sources = layout.current_shards()
    if allowlist is None:
        selection = Selection(CURATION)
        curation = layout.curation_marker
        if curation.read() is None:
            raise StageNotFinished(
                f"subset_keys is null, so the subset is the curation's kept samples, but {curation.url} does not exist: "
                "curate has not finished there (run laion_pipeline first), or give subset_keys"
            )
        shards = kept_by_shard(layout, sources, selection)
    else:
        selection = Selection(ALLOWLIST, settings.subset_keys, selected=len(allowlist))
        # A listed sample that a hash list names (one that grew after its download) is never exported.
        shards = by_shard(allowlist - blocked_keys(layout), sources)

    invalidate = once(layout.subset_marker.clear)
    results = list(run_bounded(lambda job: export_shard(layout, *job, invalidate), shards, settings.export_workers))
    exported = sorted((r for r in results if r["count"]), key=lambda r: r["shard"])
    removed = remove_stale_shards(layout, {r["shard"] for r in exported}, invalidate)

    samples = sum(r["count"] for r in exported)
    inputs = {
        "selected_by": selection.selected_by,
        "subset_keys": selection.subset_keys,
        "selection_fingerprint": digest(f"{r['shard']}:{r['fingerprint']}" for r in exported),
    }
    numbers = {
        "shards": len(exported), "samples": samples, "source_shards": len(sources), "selected": selection.selected,
        "keys_not_found": selection.selected - samples,
    }  # fmt: skip
    written = sum(1 for r in results if r["written"])
    if written or removed or layout.subset_marker.done_with({**inputs, **numbers}) is None:
        layout.subset_marker.mark_done(inputs, numbers)
    log.info(
        "Subset of %d samples in %d shards (selected by %s, %d keys not found): %d shards written, %d kept, %d removed",
        samples, len(exported), selection.selected_by, numbers["keys_not_found"], written, len(exported) - written, removed,
    )  # fmt: skip
    return {**inputs, **numbers, "shards_written": written, "shards_removed": removed, "subset": layout.subset}


# --- the selection ----------------------------------------------------------------------


def read_allowlist(url: str) -> set[str]:
    """The keys of a ``subset_keys`` file; a clear error naming the param, the file (and line)."""
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise InputError(f"subset_keys: cannot read {url}: {error}") from error
    except OSError as error:  # a store or server that may answer on the next try: not permanent
        raise OSError(f"subset_keys: cannot read {url}: {error}") from error
    keys = set()
    for number, line in enumerate(lines, start=1):
        key = line.strip()
        if not key:
            continue
        if len(key.split()) > 1 or "/" in key:
            raise InputError(f"subset_keys: {url} line {number}: expected one sample key (like 000010000003), found {line[:80]!r}")
        keys.add(key)
    if not keys:
        raise InputError(f"subset_keys: {url} lists no key: give one sample key per line")
    return keys


def kept_by_shard(layout: RunLayout, sources: list[str], selection: Selection) -> Iterator[tuple[str, frozenset[str]]]:
    """(source tar, its kept keys) for each shard keeping any sample: the decisions are read one
    part at a time (a part's partitions, ``decisions_<part>_<k>.parquet``), never all at once."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    decisions = storage.list_files(storage.join(layout.curation, "decisions"), "decisions_*.parquet")
    by_part: dict[str, list[str]] = defaultdict(list)
    for url in decisions:
        partition = posixpath.basename(url)[len("decisions_") : -len(".parquet")]
        by_part[partition.rsplit("_", 1)[0]].append(url)
    tars_by_part: dict[str, list[str]] = defaultdict(list)
    for tar in sources:
        tars_by_part[shard_location(tar)[0]].append(tar)
    for part, urls in sorted(by_part.items()):
        kept: set[str] = set()
        for url in urls:
            fs, path = url_to_fs(url)
            with fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(columns=["key", "reason"]):
                    kept.update(pc.filter(batch.column("key"), pc.is_null(batch.column("reason"))).to_pylist())
        selection.selected += len(kept)
        yield from by_shard(kept, tars_by_part.get(part, []))


def blocked_keys(layout: RunLayout) -> set[str]:
    """The samples the curation took out because a hash list names them (none before curation ran)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    blocked: set[str] = set()
    for url in storage.list_files(storage.join(layout.curation, "decisions"), "decisions_*.parquet"):
        fs, path = url_to_fs(url)
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["key", "reason"]):
                listed = pc.is_in(batch.column("reason"), value_set=pa_strings(BLOCKED_REASONS))
                blocked.update(pc.filter(batch.column("key"), listed).to_pylist())
    return blocked


def pa_strings(values: Iterable[str]) -> Any:
    import pyarrow as pa

    return pa.array(list(values), pa.string())


def by_shard(keys: Iterable[str], tars: list[str]) -> Iterator[tuple[str, frozenset[str]]]:
    """Group ``keys`` by the tar holding them: img2dataset names a sample <shard name><index
    in shard>, so its shard is the tar whose name is a prefix of its key. Keys of no tar are left out."""
    names = {shard_location(tar)[1]: tar for tar in tars}
    lengths = sorted({len(name) for name in names})
    grouped: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        tar = next((names[key[:n]] for n in lengths if key[:n] in names), None)
        if tar is not None:
            grouped[tar].add(key)
    for tar in sorted(grouped):
        yield tar, frozenset(grouped[tar])


# --- one shard ----------------------------------------------------------------------------


def export_shard(layout: RunLayout, tar: str, keys: frozenset[str], invalidate: Callable[[], None]) -> dict[str, Any]:
    """Copy the selected samples of one source shard into ``subset/<shard>.*``, unless its
    stats record this very selection; returns ``{"shard", "count", "fingerprint", "written"}``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    shard = shard_location(tar)[1]
    rows = read_parquet(tar[: -len(".tar")] + ".parquet")
    in_tar = pc.equal(rows.column("status"), "success") if "status" in rows.column_names else pa.scalar(True)
    expected = set(rows.filter(pc.and_(in_tar, has_key(rows, keys))).column("key").to_pylist())
    fingerprint = digest(sorted(expected))
    if not expected:
        return {"shard": shard, "count": 0, "fingerprint": fingerprint, "written": False}
    stats = Marker(subset_file(layout, shard, SHARD_STATS_SUFFIX), f"export_subset[{shard}]")
    inputs = {"selection_fingerprint": fingerprint, "source": "/".join(shard_location(tar)), "source_tar_size": size_of(tar)}
    done = stats.done_with(inputs)
    if done is not None and storage.exists(subset_file(layout, shard, ".tar")):
        return {"shard": shard, "count": done["count"], "fingerprint": fingerprint, "written": False}

    invalidate()
    stats.clear()  # the shard's files change: it is not done until its stats are written again
    written = copy_samples(tar, expected, subset_file(layout, shard, ".tar"))
    if written != expected:
        log.warning("%s: %d samples its parquet lists as downloaded are not in the tar", tar, len(expected - written))
    write_parquet(rows.filter(has_key(rows, written)), subset_file(layout, shard, ".parquet"))
    stats.mark_done(inputs, {"count": len(written)})
    log.info("Wrote %d samples of %s to the subset", len(written), tar)
    return {"shard": shard, "count": len(written), "fingerprint": fingerprint, "written": True}


def has_key(rows: Any, keys: Iterable[str]) -> Any:
    """Whether each row of the table ``rows`` is one of the samples ``keys``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.is_in(rows.column("key"), value_set=pa.array(sorted(keys), pa.string()))


def copy_samples(tar: str, keys: set[str], out: str) -> set[str]:
    """Stream ``tar`` and write every member of the samples ``keys`` into ``out`` (headers and
    bytes as they were, in the source's order); returns the keys written."""
    written = set()
    fs, path = url_to_fs(tar)
    with fs.open(path, "rb") as source, tarfile.open(fileobj=source, mode="r|") as reader:
        with storage.atomic_open(out, "wb") as sink, tarfile.open(fileobj=sink, mode="w|") as writer:
            for member in reader:
                key = sample_key(member.name)
                if member.isfile() and key in keys:
                    writer.addfile(member, reader.extractfile(member))
                    written.add(key)
    return written


def sample_key(name: str) -> str:
    """webdataset's key of a tar member: its path up to the first dot of its file name."""
    folder, base = posixpath.split(name)
    return posixpath.join(folder, base.split(".", 1)[0])


def subset_file(layout: RunLayout, shard: str, suffix: str) -> str:
    return storage.join(layout.subset, shard + suffix)


def remove_stale_shards(layout: RunLayout, current: set[str], invalidate: Callable[[], None]) -> int:
    """Remove the subset's shards that no longer hold a selected sample; returns how many."""
    stale: dict[str, list[str]] = defaultdict(list)
    for url in storage.list_files(layout.subset, "*"):
        name = posixpath.basename(url)
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is not None and name[: -len(suffix)] not in current:
            stale[name[: -len(suffix)]].append(url)
    for shard, urls in sorted(stale.items()):
        invalidate()
        for url in sorted(urls, key=lambda u: not u.endswith(SHARD_STATS_SUFFIX)):  # stats first: undone before it goes
            storage.remove(url)
        log.info("Removed subset shard %s: it holds no selected sample now", shard)
    return len(stale)


# --- helpers --------------------------------------------------------------------------------


def run_bounded(work: Callable[[Any], dict[str, Any]], jobs: Iterable[Any], workers: int) -> Iterator[dict[str, Any]]:
    """``work`` over ``jobs`` in ``workers`` threads, at most two jobs per worker waiting:
    the jobs (a shard's selected keys) are produced as the earlier ones finish."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="export") as pool:
        pending: set[Future] = set()
        for job in jobs:
            pending.add(pool.submit(work, job))
            if len(pending) >= 2 * workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in finished)
        finished, _ = wait(pending)
        yield from (f.result() for f in finished)


def once(action: Callable[[], None]) -> Callable[[], None]:
    """``action`` the first time the result is called, from any thread; nothing afterwards."""
    lock, done = threading.Lock(), []

    def call() -> None:
        with lock:
            if not done:
                action()
                done.append(True)

    return call


def digest(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def size_of(url: str) -> int:
    fs, path = url_to_fs(url)
    return int(fs.size(path))


def read_parquet(url: str) -> Any:
    import pyarrow.parquet as pq

    if not storage.exists(url):
        raise StageNotFinished(f"{url} does not exist: the shard's parquet is missing, so its samples cannot be exported")
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def write_parquet(table: Any, url: str) -> None:
    import pyarrow.parquet as pq

    with storage.atomic_open(url, "wb") as f:
        pq.write_table(table, f)
