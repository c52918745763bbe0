"""Where a run's artifacts live, and when each stage's output is complete.

Every stage, operator, the report and the search plugin ask a :class:`RunLayout` for a
path ("the current parts", "the finished shards of these parts", "the index folder")
instead of joining strings, and ask a :class:`Marker` whether an output is done for given
inputs instead of reading marker files themselves.

::

    <output_root>/
      raw/                          fetched metadata files (raw/_rejected/: files set aside)
      dedup/part-00000.parquet ...  unique (URL, TEXT) rows, batch after batch; dedup/_stats.json
                                    records the batches (the dataset is what it records)
      dedup/keys/batch-<n>/         the keys of each batch's rows, for later batches' dedup
      images/<part>/0000000000.tar  webdataset shards; <shard>_stats.json marks each done,
                                    images/<part>/_state/_done-<version>.json the part
      embeddings/{img_emb,text_emb,metadata}/   clip-retrieval's layout, files named by part;
                                    _parts/<part>.json marks a part, _SUCCESS.json the folder
      curation/decisions/decisions_<part>_<k>.parquet   per embedded sample, in the order of
                                    embeddings/metadata: its scores and why it was removed (if it was)
      curated/{img_emb,text_emb,metadata}/   the kept samples only, in clip-retrieval's layout:
                                    what the indexes hold; curation/_SUCCESS.json marks both
      subset/<shard>.tar ...        the curated subset as webdataset (export); _SUCCESS.json
      index/{image,text}.index      autofaiss indexes; _SUCCESS.json marks the pair
      index/metadata/, index/offsets/<part>/<shard>.parquet   search files; _SEARCH.json
      report/report.{json,html}
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Mapping

from fsspec.core import url_to_fs

from stages import storage

# Each completion marker is written last: its stage's output is complete exactly when it
# exists, and it records what the output was made from.
DEDUP_MARKER = "_stats.json"
EMBEDDINGS_MARKER = "_SUCCESS.json"
INDEX_MARKER = "_SUCCESS.json"
SEARCH_MARKER = "_SEARCH.json"
SHARD_STATS_SUFFIX = "_stats.json"  # img2dataset's: a shard is done when its stats exist
STATE_DIR = "_state"  # a part's files that are not shards (img2dataset does not read the folder)


@dataclass(frozen=True)
class Marker:
    """A stage's completion marker: a JSON file holding its numbers and the inputs they came from."""

    url: str
    stage: str = "the stage"  # the task that writes it, for messages

    def read(self) -> dict[str, Any] | None:
        return storage.read_json_or_none(self.url)

    def recorded(self) -> dict[str, Any]:
        """What the marker records; a clear error when its stage has not finished."""
        recorded = self.read()
        if recorded is None:
            raise FileNotFoundError(f"{self.url} does not exist: {self.stage} has not finished there")
        return recorded

    def done_with(self, inputs: Mapping[str, Any]) -> dict[str, Any] | None:
        """The recorded marker when it was made from exactly ``inputs``, else None."""
        recorded = self.read()
        if recorded is None or any(recorded.get(key) != value for key, value in inputs.items()):
            return None
        return recorded

    def mark_done(self, inputs: Mapping[str, Any], numbers: Mapping[str, Any]) -> dict[str, Any]:
        """Write the marker (after every output it vouches for); returns what was written."""
        recorded = {**numbers, **inputs}
        storage.write_json(self.url, recorded)
        return recorded

    def clear(self) -> None:
        """Remove the marker: its output is no longer current until marked done again."""
        if storage.exists(self.url):
            storage.remove(self.url)


class RunLayout:
    """The paths of one run's artifacts under ``output_root`` (a local path or a URL)."""

    def __init__(self, output_root: str) -> None:
        self.output_root = str(output_root)

    def __repr__(self) -> str:
        return f"RunLayout({self.output_root!r})"

    def path(self, *parts: str) -> str:
        return storage.join(self.output_root, *parts)

    # --- stage folders ----------------------------------------------------------------
    @property
    def raw(self) -> str:
        return self.path("raw")

    @property
    def dedup(self) -> str:
        return self.path("dedup")

    @property
    def images(self) -> str:
        return self.path("images")

    @property
    def embeddings(self) -> str:
        return self.path("embeddings")

    @property
    def curation(self) -> str:
        return self.path("curation")

    @property
    def subset(self) -> str:
        return self.path("subset")

    @property
    def index(self) -> str:
        return self.path("index")

    @property
    def report(self) -> str:
        return self.path("report")

    # --- files inside the stage folders -------------------------------------------------
    def embedding_files(self, kind: str) -> str:
        """clip-retrieval's output folder of one kind: ``img_emb``, ``text_emb`` or ``metadata``."""
        return self.path("embeddings", kind)

    def curated_files(self, kind: str) -> str:
        """The kept samples' files of one kind (``curated/img_emb`` ...): what the indexes hold."""
        return self.path("curated", kind)

    def decisions_file(self, partition: str) -> str:
        """One embedding partition's curation decisions (``curation/decisions/decisions_<part>_<k>.parquet``)."""
        return self.path("curation", "decisions", f"decisions_{partition}.parquet")

    def index_file(self, name: str) -> str:
        """An autofaiss index: ``index/image.index`` or ``index/text.index``."""
        return self.path("index", f"{name}.index")

    @property
    def search_metadata(self) -> str:
        """The embeddings' metadata in index order, for search (``index/metadata/``)."""
        return self.path("index", "metadata")

    @property
    def report_json(self) -> str:
        return storage.join(self.report, "report.json")

    @property
    def report_html(self) -> str:
        return storage.join(self.report, "report.html")

    # --- completion markers -------------------------------------------------------------
    @property
    def dedup_marker(self) -> Marker:
        return Marker(self.path("dedup", DEDUP_MARKER), "dedup")

    @property
    def embeddings_marker(self) -> Marker:
        return Marker(self.path("embeddings", EMBEDDINGS_MARKER), "clip_embeddings")

    def part_embeddings_marker(self, part: str) -> Marker:
        """Written when one dedup part's shards are embedded (``embeddings/_parts/<part>.json``)."""
        return Marker(self.path("embeddings", "_parts", f"{part}.json"), f"clip_embeddings[{part}]")

    @property
    def curation_marker(self) -> Marker:
        return Marker(self.path("curation", "_SUCCESS.json"), "curate")

    @property
    def subset_marker(self) -> Marker:
        return Marker(self.path("subset", "_SUCCESS.json"), "export_subset")

    @property
    def index_marker(self) -> Marker:
        return Marker(self.path("index", INDEX_MARKER), "build_index")

    @property
    def search_marker(self) -> Marker:
        return Marker(self.path("index", SEARCH_MARKER), "build_index")

    def has_index(self) -> bool:
        """Whether a complete pair of indexes is published (what the search plugin offers)."""
        return storage.exists(self.index_marker.url)

    # --- dedup parts ----------------------------------------------------------------------
    def dedup_stats(self) -> dict[str, Any]:
        """dedup's ``_stats.json``; a clear error when dedup has not finished here."""
        return self.dedup_marker.recorded()

    def current_parts(self, dedup_stats: Mapping[str, Any] | None = None) -> list[str]:
        """The part names (``part-00000`` ...) of the current dedup output."""
        stats = self.dedup_stats() if dedup_stats is None else dedup_stats
        return [p.split(".")[0] for p in stats["parts"]]

    def part_versions(self, dedup_stats: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Part name (``part-00003``) -> the version of the batch that wrote its rows."""
        stats = self.dedup_stats() if dedup_stats is None else dedup_stats
        return {p.split(".")[0]: b["version"] for b in stats.get("batches", []) for p in b["parts"]}

    def part_version(self, part: str, dedup_stats: Mapping[str, Any] | None = None) -> str:
        """Names the rows of one part (``part-00003``): the version of the batch that wrote it."""
        versions = self.part_versions(dedup_stats)
        if part not in versions:
            raise ValueError(f"{part} is not a part of the dataset at {self.output_root} (see {self.dedup_marker.url})")
        return versions[part]

    def batch_parts(self, batch: int | None = None, dedup_stats: Mapping[str, Any] | None = None) -> list[str]:
        """The part names of one batch (default: the latest)."""
        stats = self.dedup_stats() if dedup_stats is None else dedup_stats
        found = [b for b in stats.get("batches", []) if batch is None or b["batch"] == batch]
        return [p.split(".")[0] for p in found[-1]["parts"]] if found else []

    def pending_parts(self, dedup_stats: Mapping[str, Any] | None = None, clip_model: str | None = None) -> list[str]:
        """The current parts whose download has not finished (no download marker for the
        version of their rows: one listing of the image folders' markers) or, given
        ``clip_model``, whose embeddings with that model have not (no part marker naming it)."""
        stats = self.dedup_stats() if dedup_stats is None else dedup_stats
        fs, root = url_to_fs(self.images)
        done = {posixpath.relpath(path, root) for path in fs.glob(posixpath.join(root, "*", STATE_DIR, "_done-*.json"))}
        versions = self.part_versions(stats)  # once: a dataset may have tens of thousands of parts
        pending = []
        for part in self.current_parts(stats):
            downloaded = posixpath.join(part, STATE_DIR, download_marker_name(versions.get(part) or self.part_version(part, stats))) in done
            if not downloaded or (clip_model is not None and not self.part_embeddings_marker(part).done_with({"clip_model": clip_model})):
                pending.append(part)
        return pending

    def part(self, part: str) -> str:
        """A dedup part's parquet file (``dedup/part-00003.parquet``)."""
        return self.path("dedup", f"{part}.parquet")

    def part_images(self, part: str) -> str:
        """The folder of a part's shards (``images/part-00003``)."""
        return self.path("images", part)

    def download_marker(self, part: str, version: str) -> Marker:
        """Written when every shard of a part is finished, named by the version of the part's
        rows (``images/<part>/_state/_done-<version>.json``)."""
        return Marker(self.path("images", part, STATE_DIR, download_marker_name(version)), "download_images")

    # --- shards ---------------------------------------------------------------------------
    def shard_stats(self, parts: list[str] | None = None) -> list[str]:
        """The ``*_stats.json`` of every finished shard of ``parts`` (default: the current parts), sorted."""
        parts = self.current_parts() if parts is None else parts
        fs, root = url_to_fs(self.images)
        found = (f for part in parts for f in fs.glob(posixpath.join(root, part, "*" + SHARD_STATS_SUFFIX)))
        return sorted(storage.url_of(fs, f, like=self.output_root) for f in found)

    def current_shards(self, parts: list[str] | None = None) -> list[str]:
        """The tar of every finished shard of ``parts`` (default: the current parts), sorted.

        A shard is finished once img2dataset wrote its stats file and its tar exists.
        """
        tars = []
        for stats in self.shard_stats(parts):
            tar = stats[: -len(SHARD_STATS_SUFFIX)] + ".tar"
            if storage.exists(tar):
                tars.append(tar)
        return tars

    def offsets_table(self, part: str, shard: str) -> str:
        """Where a shard's member offsets live (``index/offsets/<part>/<shard>.parquet``)."""
        return self.path("index", "offsets", part, f"{shard}.parquet")

    def offsets_tables(self) -> list[str]:
        fs, root = url_to_fs(self.index)
        found = fs.glob(posixpath.join(root, "offsets", "*", "*.parquet"))
        return sorted(storage.url_of(fs, f, like=self.output_root) for f in found)


def download_marker_name(version: str) -> str:
    return f"_done-{version}.json"


def shard_location(tar_url: str) -> tuple[str, str]:
    """``.../images/part-00001/0000100002.tar`` -> (``part-00001``, ``0000100002``)."""
    return posixpath.basename(posixpath.dirname(tar_url)), posixpath.basename(tar_url)[: -len(".tar")]
