"""curate: scores and filters over the stored embeddings, between clip_embeddings and build_index.

For every embedded sample, ``clip_score`` is the cosine of its image and text embeddings
(from the npy files: no second inference) and, with a ``classifier``, that scorer's score
of its image embedding. The filters then decide, in this order, and each removal names its
reason: ``blocked_url`` and ``blocked_image`` (its URL, or the sha256 of its image as
served, is on a hash list now: the lists grew since its part was downloaded; the download
itself never fetches or writes what is listed then), ``below_clip_score`` (score under
``min_clip_score``), ``classifier`` (score over ``max_classifier_score``),
``near_duplicate`` (one of a group of images whose embeddings have a cosine of at least
``near_duplicate_threshold``, or the same bytes; see
:mod:`stages.curate.near_duplicates`). A group keeps its sample with the highest
clip_score (ties: the first in the embeddings' order); only samples that pass the score
filters are grouped.

Outputs, per embedding partition:

- ``curation/decisions/decisions_<partition>.parquet``: every sample, in the order of
  ``embeddings/metadata``, with its scores and ``reason`` (null: kept);
- ``curated/{img_emb,text_emb,metadata}/``: the kept samples only, under the names of
  ``embeddings/`` plus a digest of the rows kept (``img_emb_<partition>-<digest>.npy``;
  metadata with ``clip_score`` added): what build_index indexes, so the index and the
  search hold only kept samples and a search row is a kept sample's row.

A partition whose decisions did not change keeps its files as they are (a grown index then
adds only the new ones). Changing a filter rewrites only curation outputs: the embeddings
are never recomputed. ``curation/_SUCCESS.json`` is written last, with the counts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from stages import storage
from stages.curate.blocklists import BlocklistSettings, image_blocklist, url_blocklist
from stages.curate.classifier import load_classifier, scores_of
from stages.curate.curated_files import KINDS, curated_files_of, curated_name, remove_stale, selection_digest
from stages.curate.near_duplicates import find_groups, hash_prefix
from stages.embedding_plans import fingerprint
from stages.layout import RunLayout
from stages.settings import setting

log = logging.getLogger(__name__)

KEPT, BLOCKED_URL, BLOCKED_IMAGE, BELOW, CLASSIFIER, NEAR = range(6)  # reason codes, in the order filters apply
REASONS = {BLOCKED_URL: "blocked_url", BLOCKED_IMAGE: "blocked_image", BELOW: "below_clip_score", CLASSIFIER: "classifier", NEAR: "near_duplicate"}
HISTOGRAM_BINS = 20
PAIRS_SHOWN = 8  # removed near-duplicate pairs named in the marker (the report shows them)
# Rows per row group of the curated metadata: the search service decodes one group per hit
# (256 rows of three columns: 0.05 ms; 1,024: 0.1 ms; the footer grows ~1.5 KB a group).
SEARCH_ROW_GROUP = 256


@dataclass(frozen=True)
class CurationSettings:
    """Which embedded samples the index and the curated subset keep."""

    min_clip_score: float | None = setting(
        None, type=["null", "number"], minimum=-1, maximum=1,
        description="Keep pairs whose image-caption cosine is at least this (LAION-400M: 0.3 with ViT-B/32); empty: no filter.",
    )  # fmt: skip
    near_duplicate_threshold: float | None = setting(
        None, type=["null", "number"], exclusiveMinimum=0, maximum=1,
        description="Keep one image of each group whose embeddings have at least this cosine (e.g. 0.95); empty: no filter.",
    )  # fmt: skip
    classifier: str | None = setting(
        None, type=["null", "string"],
        description="A scorer over image embeddings: a torch model file or 'module:callable' (an NSFW or watermark tagger).",
    )  # fmt: skip
    max_classifier_score: float | None = setting(
        None, type=["null", "number"], description="Remove samples whose classifier score is above this; empty: only record the score."
    )
    # The download's hash lists, checked again here: a list that grew after a part was
    # downloaded (Re-LAION's case) takes its samples out of the index, the search and the subset.
    blocklists: BlocklistSettings = dataclasses.field(default_factory=BlocklistSettings)

    def __post_init__(self) -> None:
        for name, low, high in (("min_clip_score", -1.0, 1.0), ("near_duplicate_threshold", 0.0, 1.0), ("max_classifier_score", None, None)):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} = {value!r}: expected a number or null") from None
            if (low is not None and not low <= value <= high) or (name == "near_duplicate_threshold" and value <= 0):
                span = "(0, 1]" if name == "near_duplicate_threshold" else f"[{low:g}, {high:g}]"
                raise ValueError(f"{name} = {value!r} is out of range: expected a number in {span} or null")
            object.__setattr__(self, name, value)
        if self.max_classifier_score is not None and not self.classifier:
            raise ValueError("max_classifier_score is set but classifier is not: name the scorer whose score it bounds")

    def check(self) -> None:
        """Fail now, before any work, on a classifier that cannot be loaded."""
        if self.classifier:
            load_classifier(self.classifier)

    @classmethod
    def recorded(cls, values: dict[str, Any]) -> CurationSettings:
        """The settings a curation marker recorded (``dataclasses.asdict`` of them)."""
        return cls(**{**values, "blocklists": BlocklistSettings(**values.get("blocklists", {}))})


def partitions_of(layout: RunLayout) -> list[str]:
    """The embedding partitions (``part-00000_00000`` ...) with metadata, in name order."""
    files = storage.list_files(layout.embedding_files("metadata"), "metadata_*.parquet")
    return sorted(posixpath.basename(f)[len("metadata_") : -len(".parquet")] for f in files)


def read_npy(url: str) -> Any:
    import numpy as np

    with fsspec.open(url, "rb") as f:
        return np.load(io.BytesIO(f.read()))


def read_parquet(url: str) -> Any:
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as f:
        return pq.read_table(f)


def read_parquet_columns(url: str, columns: tuple[str, ...] = ("key", "image_path")) -> Any:
    """Only ``columns`` of a parquet file (those it has)."""
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as f:
        parquet = pq.ParquetFile(f)
        return parquet.read(columns=[c for c in columns if c in parquet.schema_arrow.names])


def cosine(a: Any, b: Any) -> Any:
    import numpy as np

    a, b = a.astype("float32"), b.astype("float32")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-12)).astype("float32")


def curate(layout: RunLayout, settings: CurationSettings) -> dict[str, Any]:
    """Score and filter every embedded sample; write the decisions and the curated folder."""
    import numpy as np

    partitions = partitions_of(layout)
    inputs_files = [storage.join(layout.embedding_files(k), f"{k}_{p}.{'parquet' if k == 'metadata' else 'npy'}") for p in partitions for k in KINDS]
    embedded = layout.embeddings_marker.recorded()
    # A list's file may change under the same name: the inputs name its contents.
    urls_blocked, images_blocked = url_blocklist(settings.blocklists), image_blocklist(settings.blocklists)
    inputs = {
        "input_fingerprint": fingerprint(inputs_files),
        "clip_model": embedded.get("clip_model"),
        "settings": json.loads(json.dumps(dataclasses.asdict(settings))),  # as the marker's JSON gives it back
        "blocklists": [urls_blocked.fingerprint(), images_blocked.fingerprint()],
    }
    done = layout.curation_marker.done_with(inputs)
    if done is not None:
        log.info("Skipping curate: %s matches the current embeddings and settings", layout.curation_marker.url)
        return {**done, "skipped": True}
    if not partitions:
        raise FileNotFoundError(f"no embeddings under {layout.embeddings}: run clip_embeddings first")
    scorer = load_classifier(settings.classifier) if settings.classifier else None

    # Pass 1, one partition at a time: scores and the score filters.
    # What is held for the whole dataset: a few numbers per sample (score, reason, hash
    # prefix), never its key or its vectors (each partition's are read when needed).
    scores, classifier_scores, reasons, hashes, sizes = [], [], [], [], []
    for partition in partitions:
        meta = read_parquet(storage.join(layout.embedding_files("metadata"), f"metadata_{partition}.parquet"))
        image = read_npy(storage.join(layout.embedding_files("img_emb"), f"img_emb_{partition}.npy"))
        text = read_npy(storage.join(layout.embedding_files("text_emb"), f"text_emb_{partition}.npy"))
        if not (len(image) == len(text) == meta.num_rows):
            raise ValueError(f"embedding partition {partition}: {len(image)} image, {len(text)} text embeddings and {meta.num_rows} metadata rows")
        score = cosine(image, text)
        tagged = scores_of(scorer, np.ascontiguousarray(image, dtype="float32"), settings.classifier) if scorer else None
        reason = np.zeros(len(score), dtype="int8")
        sha = meta.column("sha256").to_pylist() if "sha256" in meta.column_names else [None] * meta.num_rows
        if urls_blocked and "url" in meta.column_names:
            reason[[urls_blocked.matches_url(u or "") for u in meta.column("url").to_pylist()]] = BLOCKED_URL
        if images_blocked.sha256:  # the metadata has each image's sha256 as served; an md5 needs the bytes
            listed = [bool(s) and bytes.fromhex(s) in images_blocked.sha256 for s in sha]
            reason[(reason == KEPT) & np.array(listed, dtype=bool)] = BLOCKED_IMAGE
        if settings.min_clip_score is not None:
            reason[(reason == KEPT) & (score < settings.min_clip_score)] = BELOW
        if tagged is not None and settings.max_classifier_score is not None:
            reason[(reason == KEPT) & (tagged > settings.max_classifier_score)] = CLASSIFIER
        scores.append(score)
        classifier_scores.append(tagged)
        reasons.append(reason)
        hashes.append(hash_prefix(sha))
        sizes.append(meta.num_rows)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype("int64")
    all_scores, all_reasons = np.concatenate(scores), np.concatenate(reasons)

    # Pass 2, only with a threshold: near-duplicate groups among the samples still kept.
    duplicate_of = np.full(len(all_scores), -1, dtype="int64")
    duplicate_cosine = np.full(len(all_scores), np.nan, dtype="float32")
    pairs: list[dict[str, Any]] = []
    if settings.near_duplicate_threshold is not None:
        pairs = remove_near_duplicates(
            layout, partitions, all_scores, all_reasons, np.concatenate(hashes),
            settings.near_duplicate_threshold, duplicate_of, duplicate_cosine,
        )  # fmt: skip

    # Pass 3: each partition's decisions and kept rows, rewritten only when they changed.
    keeper_keys = keys_at(layout, partitions, starts, np.unique(duplicate_of[duplicate_of >= 0]))
    shown = keys_at(layout, partitions, starts, [p["key"] for p in pairs])  # rows, named now
    pairs = [{**p, "key": shown[p["key"]], "duplicate_of": keeper_keys[p["duplicate_of"]]} for p in pairs]
    rewritten = 0
    for i, partition in enumerate(partitions):
        window = slice(starts[i], starts[i + 1])
        rewritten += write_partition(
            layout, partition, scores[i], classifier_scores[i], all_reasons[window],
            duplicate_of[window], duplicate_cosine[window], keeper_keys, embedded.get("clip_model"),
        )  # fmt: skip
    removed = remove_stale(layout, partitions)
    counts = {name: int((all_reasons == code).sum()) for code, name in REASONS.items()}
    edges = np.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1)
    histogram, _ = np.histogram(np.clip(all_scores, -1.0, 1.0), bins=edges)
    numbers = {
        "embedded": int(len(all_scores)),
        "blocked_after_download": counts["blocked_url"] + counts["blocked_image"],
        "below_clip_score": counts["below_clip_score"],
        "classifier": counts["classifier"],
        "near_duplicates": counts["near_duplicate"],
        "kept": int((all_reasons == KEPT).sum()),
        "min_clip_score": settings.min_clip_score,
        "near_duplicate_threshold": settings.near_duplicate_threshold,
        "max_classifier_score": settings.max_classifier_score,
        "classifier_name": settings.classifier,
        "clip_score_mean": round(float(all_scores.mean()), 4) if len(all_scores) else None,
        "clip_score_histogram": {"edges": [round(float(e), 3) for e in edges], "counts": histogram.tolist()},
        "near_duplicate_pairs": pairs[:PAIRS_SHOWN],
        "partitions": len(partitions),
        "partitions_rewritten": rewritten,
        "partitions_removed": removed,
    }
    log.info(
        "Curated %d samples: kept %d, below clip score %d, classifier %d, near duplicates %d; %d partitions rewritten",
        numbers["embedded"], numbers["kept"], numbers["below_clip_score"], numbers["classifier"], numbers["near_duplicates"], rewritten,
    )  # fmt: skip
    return layout.curation_marker.mark_done(inputs, numbers)


def remove_near_duplicates(
    layout: RunLayout,
    partitions: list[str],
    scores: Any,
    reasons: Any,
    hashes: Any,
    threshold: float,
    duplicate_of: Any,
    duplicate_cosine: Any,
) -> list[dict[str, Any]]:
    """Mark all but one sample of each near-duplicate group ``NEAR`` (in ``reasons``), with
    the row it duplicates and their cosine. The group keeps its highest clip_score (ties:
    the first in the embeddings' order). Returns the ``PAIRS_SHOWN`` most similar removed
    pairs as rows (``key``, ``duplicate_of``: row numbers, named by the caller)."""
    import numpy as np

    from stages.index.rerank import StoredVectors

    stored = StoredVectors(layout.embedding_files("img_emb"), names=[f"img_emb_{p}.npy" for p in partitions]).open()
    candidates = np.flatnonzero(reasons == KEPT)  # rows, ascending

    def blocks() -> Any:
        first = 0
        for start, block in stored.blocks():
            stop = start + len(block)
            last = int(np.searchsorted(candidates, stop))
            yield first, block[candidates[first:last] - start]
            first = last

    def take(positions: Any) -> Any:
        return stored.take(candidates[positions])

    groups, cosines = find_groups(len(candidates), stored.dim, blocks, take, hashes[candidates], threshold)
    n = len(candidates)
    roots = groups.roots()
    # Sorted by group, best score first, then embedding order: each group's first is its keeper.
    order = np.lexsort((np.arange(n), -scores[candidates], roots))
    firsts = order[np.r_[True, roots[order][1:] != roots[order][:-1]]] if n else order
    keeper_at_root = np.full(n, -1, dtype="int64")
    keeper_at_root[roots[firsts]] = firsts
    keeper = keeper_at_root[roots]
    removed = np.flatnonzero(keeper != np.arange(n))
    best_pair: dict[int, float] = {}  # a removed sample's highest cosine in any pair, when not joined to its keeper directly
    for (a, b), value in cosines.items():
        for x in (a, b):
            best_pair[x] = max(best_pair.get(x, -1.0), value)
    pairs = []
    for i in removed.tolist():
        k = int(keeper[i])
        row, keeper_row = int(candidates[i]), int(candidates[k])
        reasons[row] = NEAR
        duplicate_of[row] = keeper_row
        duplicate_cosine[row] = cosines.get((min(i, k), max(i, k)), best_pair.get(i, np.nan))
        pairs.append((-float(duplicate_cosine[row]), row, keeper_row))
    pairs.sort()
    return [{"key": row, "duplicate_of": keeper_row, "cosine": round(-negative, 4)} for negative, row, keeper_row in pairs[:PAIRS_SHOWN]]


def keys_at(layout: RunLayout, partitions: list[str], starts: Any, rows: Any) -> dict[int, str]:
    """Row number -> sample key, for ``rows``: only the key columns of their partitions are read."""
    import numpy as np

    rows = np.asarray(rows, dtype="int64")
    found: dict[int, str] = {}
    for p in np.unique(np.searchsorted(starts, rows, side="right") - 1).tolist():
        wanted = rows[(rows >= starts[p]) & (rows < starts[p + 1])]
        column = key_column(read_parquet_columns(storage.join(layout.embedding_files("metadata"), f"metadata_{partitions[p]}.parquet")))
        keys = column.to_pylist()
        found.update((int(r), keys[int(r - starts[p])]) for r in wanted)
    return found


def key_column(meta: Any) -> Any:
    """A metadata table's sample keys (img2dataset's ``key``; ``image_path`` holds the same)."""
    return meta.column("key" if "key" in meta.column_names else "image_path")


def write_partition(
    layout: RunLayout,
    partition: str,
    score: Any,
    tagged: Any,
    reason: Any,
    duplicate_of: Any,
    duplicate_cosine: Any,
    keeper_keys: dict[int, str],
    clip_model: str | None,
) -> int:
    """Write one partition's decisions and kept rows unless those on storage say the same; 1 if written.

    ``duplicate_of`` holds row numbers of the whole dataset; ``keeper_keys`` names them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta_url = storage.join(layout.embedding_files("metadata"), f"metadata_{partition}.parquet")
    meta = read_parquet(meta_url)
    keys = key_column(meta).to_pylist()
    decisions = pa.table({
        "key": pa.array(keys, pa.string()),
        "clip_score": pa.array(score, pa.float32()),
        "classifier_score": pa.array(tagged if tagged is not None else [None] * len(keys), pa.float32()),
        "sha256": meta.column("sha256") if "sha256" in meta.column_names else pa.nulls(len(keys), pa.string()),
        "near_duplicate_of": pa.array([keeper_keys[int(r)] if r >= 0 else None for r in duplicate_of], pa.string()),
        "near_duplicate_cosine": pa.array([None if np.isnan(c) else float(c) for c in duplicate_cosine], pa.float32()),
        "reason": pa.array([REASONS.get(int(r)) for r in reason], pa.string()),
    })  # fmt: skip
    url = layout.decisions_file(partition)
    kept = np.flatnonzero(reason == KEPT)
    digest = selection_digest([keys[i] for i in kept], clip_model)
    outputs = {k: storage.join(layout.curated_files(k), curated_name(k, partition, digest)) for k in KINDS} if len(kept) else {}
    present = curated_files_of(layout, partition)
    if storage.exists(url) and read_parquet(url).equals(decisions) and set(outputs.values()) == set(present):
        return 0
    # Kept rows first, decisions last: a partition whose decisions are on storage is complete.
    for kind, output in outputs.items():
        if output in present:  # the same selection of the same embeddings: the file is already right
            continue
        with storage.atomic_open(output, "wb") as f:
            if kind == "metadata":
                kept_rows = meta.take(pa.array(kept)).append_column("clip_score", pa.array(score[kept], pa.float32()))
                pq.write_table(kept_rows, f, row_group_size=SEARCH_ROW_GROUP)
            else:
                buffer = io.BytesIO()
                np.save(buffer, read_npy(storage.join(layout.embedding_files(kind), f"{kind}_{partition}.npy"))[kept])
                f.write(buffer.getvalue())
    for old in set(present) - set(outputs.values()):  # an earlier selection (or nothing kept now)
        storage.remove(old)
    with storage.atomic_open(url, "wb") as f:
        pq.write_table(decisions, f)
    return 1
