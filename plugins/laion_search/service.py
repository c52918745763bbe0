"""The search service's state: loaded runs, CLIP encoders, query latency.

Nothing heavy is imported before the first request: a run's index (memory-mapped when its
type allows), metadata rows and shard readers are loaded on first use and kept. A loaded run
is checked again when build_index emits an event on the ``laion_index`` Asset, or at the
latest every ``LAION_SEARCH_RECHECK_SECONDS`` (runs named by LAION_SEARCH_ROOTS may be
rebuilt by another Airflow), and reloaded when a new publication is complete: an
``index/_SUCCESS.json`` whose fingerprint ``index/_SEARCH.json`` names. While build_index
publishes, the loaded run keeps answering.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from laion_search.catalog import Run, RunCatalog, UnknownRun
from laion_search.encoder import ClipEncoder
from laion_search.reader import Hit, RunIndex, SampleReader
from stages import storage
from stages.index import INDEX_ASSET
from stages.layout import RunLayout

log = logging.getLogger(__name__)


class LatencyWindow:
    """p50/p95 of the last ``size`` queries of each kind (text, image, key)."""

    def __init__(self, size: int = 1000) -> None:
        self._seconds: dict[str, deque[float]] = {}
        self._total: dict[str, int] = {}
        self._size = size
        self._lock = threading.Lock()

    def add(self, kind: str, seconds: float) -> None:
        with self._lock:
            self._seconds.setdefault(kind, deque(maxlen=self._size)).append(seconds)
            self._total[kind] = self._total.get(kind, 0) + 1
        from airflow.stats import Stats

        Stats.timing(f"laion_search.query.{kind}", seconds * 1000)

    @staticmethod
    def _summary(seconds: list[float], total: int) -> dict[str, Any]:
        ordered = sorted(seconds)

        def percentile(p: float) -> float | None:  # nearest rank
            return round(ordered[max(0, int(-(-p * len(ordered) // 100)) - 1)] * 1000, 2) if ordered else None

        return {"queries": total, "window": len(ordered), "p50_ms": percentile(50), "p95_ms": percentile(95)}

    def summary(self) -> dict[str, Any]:
        with self._lock:
            every = [s for window in self._seconds.values() for s in window]
            by_kind = {kind: self._summary(list(w), self._total[kind]) for kind, w in sorted(self._seconds.items())}
        return {**self._summary(every, sum(self._total.values())), "by_kind": by_kind}


@dataclass
class LoadedRun:
    run: Run
    index: RunIndex
    samples: SampleReader
    clip_model: str
    fingerprint: str
    loaded_at: float
    check_at: float  # when to look for a new publication again (-inf: on next use)


class IndexBeingPublished(UnknownRun):
    """The run's index and search files are being published: no complete pair to load yet."""


def index_fingerprint(output_root: str) -> str | None:
    """The fingerprint of the index pair that ``index/_SUCCESS.json`` vouches for."""
    return (RunLayout(output_root).index_marker.read() or {}).get("input_fingerprint")


def named_index_fingerprint(output_root: str) -> str | None:
    """The index fingerprint that ``index/_SEARCH.json`` names: the search files were written
    for that index (a small file, unlike the index marker)."""
    return (RunLayout(output_root).search_marker.read() or {}).get("index_fingerprint")


def published_index_fingerprint(output_root: str) -> str | None:
    """The fingerprint of the run's complete publication: the index marker's, when the search
    marker names it too; None while build_index publishes (or before it ever did)."""
    named = named_index_fingerprint(output_root)
    return named if named is not None and index_fingerprint(output_root) == named else None


def latest_index_event_id() -> int | None:
    """The newest event of the ``laion_index`` Asset in the metadata database."""
    from sqlalchemy import func, select

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    query = select(func.max(AssetEvent.id)).join(AssetModel, AssetModel.id == AssetEvent.asset_id)
    with create_session() as session:
        return session.scalar(query.where(AssetModel.name == INDEX_ASSET))


_NOT_READ = object()  # before the first look at the Asset's events


class SearchService:
    def __init__(self, catalog: RunCatalog | None = None, recheck_seconds: float | None = None) -> None:
        self.catalog = catalog or RunCatalog()
        if recheck_seconds is None:
            recheck_seconds = float(os.environ.get("LAION_SEARCH_RECHECK_SECONDS", "60"))
        self.recheck_seconds = recheck_seconds
        self.latency = LatencyWindow()
        self.reloads = 0
        self._runs: dict[str, LoadedRun] = {}
        self._encoders: dict[str, ClipEncoder] = {}
        self._lock = threading.RLock()
        # Models load apart from runs: a query's model load must not hold up image and report requests.
        self._encoder_lock = threading.Lock()
        self._last_event_id: Any = _NOT_READ
        self._events_checked_at = float("-inf")

    # --- loading ---------------------------------------------------------------------------

    def loaded(self, run: Run) -> LoadedRun:
        self._watch_index_events()
        with self._lock:
            current = self._runs.get(run.output_root)
            if current is None or (time.monotonic() >= current.check_at and self._new_publication(current)):
                try:
                    fresh = self._runs[run.output_root] = self._load(run)
                except IndexBeingPublished:
                    if current is None:
                        raise
                    log.info("Index of %s is being published again: answering from the loaded one", run.output_root)
                    current.check_at = time.monotonic() + self.recheck_seconds  # or on the publication's event
                    return current
                if current is not None:
                    self.reloads += 1
                current = fresh
            return current

    def _new_publication(self, current: LoadedRun) -> bool:
        """Whether a new publication of ``current``'s run is complete (else it is checked
        again after ``recheck_seconds``, or on the next ``laion_index`` event).

        Until the search marker names the new index, the search files may be half written:
        the loaded run keeps answering, and the event of build_index's end brings the check
        that finds the publication complete.
        """
        root = current.run.output_root
        named = named_index_fingerprint(root)
        if named is not None and named != current.fingerprint and index_fingerprint(root) == named:
            log.info("Index of %s changed: reloading it", root)
            return True
        current.check_at = time.monotonic() + self.recheck_seconds
        return False

    def _load(self, run: Run) -> LoadedRun:
        started = time.monotonic()
        storage.configure_storage(run.output_root, run.storage_conn_id)
        fingerprint = self._published(run)
        index = RunIndex(run.output_root)
        index.index, index.rows  # noqa: B018 - load now, under the lock, not in the first query
        marker = index.layout.embeddings_marker
        embeddings = marker.read()
        if embeddings is None:  # its clip_model names the model that queries must be encoded with
            raise FileNotFoundError(f"{marker.url} does not exist: the CLIP model of run {run.run_id} is unknown")
        if self._published(run) != fingerprint:  # a publication began while the files were read
            raise IndexBeingPublished(f"the index of run {run.run_id} changed while it was loaded: try again once build_index has finished")
        log.info(
            "Loaded %s: %d vectors (%s) in %.2f s",
            run.output_root, index.index.ntotal, "memory-mapped" if index.memory_mapped else "in memory",
            time.monotonic() - started,
        )
        now = time.monotonic()
        return LoadedRun(run, index, SampleReader(run.output_root), embeddings["clip_model"], fingerprint, now, now + self.recheck_seconds)

    @staticmethod
    def _published(run: Run) -> str:
        fingerprint = published_index_fingerprint(run.output_root)
        if fingerprint is None:
            raise IndexBeingPublished(
                f"run {run.run_id} has no complete index publication under {run.output_root}: build_index is publishing "
                f"one (try again once it has finished), or wrote it before {RunLayout(run.output_root).search_marker.url} "
                "named its index (rerun build_index: it then only rewrites that file)"
            )
        return fingerprint

    def _watch_index_events(self) -> None:
        """A new ``laion_index`` event makes every loaded run check its index on next use."""
        if time.monotonic() - self._events_checked_at < 1.0:
            return
        self._events_checked_at = time.monotonic()
        try:
            latest = latest_index_event_id()
        except Exception:  # the metadata database is down: serve what is loaded
            log.warning("Cannot read %s events; keeping the loaded indexes", INDEX_ASSET, exc_info=True)
            return
        if self._last_event_id is not _NOT_READ and latest != self._last_event_id:
            log.info("New %s event %s: checking the loaded indexes", INDEX_ASSET, latest)
            self.catalog.refresh()
            with self._lock:
                for loaded in self._runs.values():
                    loaded.check_at = float("-inf")
        self._last_event_id = latest

    def warm_up(self, run: Run) -> None:
        """Load ``run`` and its CLIP model in the background, so that its first query is fast."""
        if run.output_root not in self._runs:
            threading.Thread(target=self._warm, args=(run,), name="laion-search-warm-up", daemon=True).start()

    def _warm(self, run: Run) -> None:
        try:
            self.encoder(self.loaded(run).clip_model)
        except Exception:  # the first query loads it again and reports the error
            log.warning("Warming up %s failed", run.output_root, exc_info=True)

    def encoder(self, clip_model: str) -> ClipEncoder:
        with self._encoder_lock:
            if clip_model not in self._encoders:
                self._encoders[clip_model] = ClipEncoder(clip_model)
            return self._encoders[clip_model]

    # --- queries ---------------------------------------------------------------------------

    def search(self, run_id: str, *, k: int, text: str | None = None, key: str | None = None, image: Any = None) -> tuple[Run, list[Hit]]:
        """Top ``k`` samples for one of ``text``, a sample ``key`` or a PIL ``image``."""
        started = time.perf_counter()
        run = self.catalog.get(run_id)
        loaded = self.loaded(run)
        if text is not None:
            kind, vector = "text", self.encoder(loaded.clip_model).encode_text(text)
        elif key is not None:
            kind, vector = "key", loaded.index.vector_of(key)
        else:
            kind, vector = "image", self.encoder(loaded.clip_model).encode_image(image)
        hits = loaded.index.search_vector(vector, k)
        self.latency.add(kind, time.perf_counter() - started)
        return run, hits

    def sample_bytes(self, run_id: str, key: str, ext: str = "jpg") -> bytes:
        return self.loaded(self.catalog.get(run_id)).samples.read(key, ext)

    def sample_rows(self, run_id: str, count: int) -> list[dict[str, str]]:
        """``count`` samples spread evenly over the run, for a report's image grid."""
        rows = self.loaded(self.catalog.get(run_id)).index.rows
        step = max(1, len(rows) // max(1, count))
        picked = [rows.row(i) for i in range(0, len(rows), step)[:count]]
        return [{"key": r["image_path"], "caption": r["caption"], "url": r["url"]} for r in picked]

    def status(self) -> dict[str, Any]:
        with self._lock:
            loaded = [
                {
                    "run_id": lr.run.run_id,
                    "output_root": lr.run.output_root,
                    "vectors": int(lr.index.index.ntotal),
                    "memory_mapped": lr.index.memory_mapped,
                    "clip_model": lr.clip_model,
                    "loaded_seconds_ago": round(time.monotonic() - lr.loaded_at, 1),
                }
                for lr in self._runs.values()
            ]
            encoders = sorted(self._encoders)
        return {"search": self.latency.summary(), "loaded_runs": loaded, "encoders": encoders, "index_reloads": self.reloads}
