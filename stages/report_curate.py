"""The report's curation: what each filter removed (report.json's ``curate``), its funnel
steps, and for report.html the clip_score histogram with its threshold and a few removed
near-duplicate pairs, their thumbnails read from the shards.

Only counts and keys are reported: a blocklist's digests never appear.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from typing import Any, Mapping

from fsspec.core import url_to_fs

from stages import storage
from stages.curate.blocklists import blocked_counts
from stages.layout import RunLayout, shard_location

log = logging.getLogger(__name__)

NOT_RUN = "not run"  # the curate object's state when no curation is on storage
PAIRS_SHOWN = 8  # removed near-duplicate pairs in report.html: their thumbnails are inlined
THUMBNAIL_PX = 96
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format choices
# The curation marker's numbers, as the curate object names them (None until curation ran).
NUMBERS = ("embedded", "blocked_after_download", "below_clip_score", "classifier", "near_duplicates", "kept", "clip_score_mean")
SETTINGS = ("min_clip_score", "near_duplicate_threshold", "max_classifier_score", "classifier_name")
# The filters in the order curate applies them: (funnel step, curate object's count).
FILTERS = (("blocked since downloaded", "blocked_after_download"), ("below the CLIP score", "below_clip_score"), ("classifier", "classifier"), ("near-duplicates", "near_duplicates"))


def summarize_curation(layout: RunLayout, parts: list[str], unfinished: str | None) -> dict[str, Any]:
    """report.json's ``curate``: the blocklists' counts, then, when curation finished, what
    each filter removed, its thresholds, the clip_score histogram and the pairs shown.

    ``unfinished`` is the curate stage's state when it did not succeed in this run: then its
    marker (perhaps an earlier run's) is not read. Without a marker the numbers are None
    and ``state`` says why: ``not run``, or the stage's state.
    """
    curate: dict[str, Any] = {"state": "success", **blocked_counts(layout, parts)}
    marker = layout.curation_marker.read() if unfinished is None else None
    if marker is None:
        curate["state"] = unfinished or NOT_RUN
        return {**curate, **dict.fromkeys(NUMBERS + SETTINGS), "clip_score_histogram": None, "near_duplicate_pairs": []}
    return {
        **curate,
        **{k: marker.get(k) for k in NUMBERS + SETTINGS},
        "clip_score_histogram": marker.get("clip_score_histogram"),
        "near_duplicate_pairs": list(marker.get("near_duplicate_pairs") or [])[:PAIRS_SHOWN],
    }


def blocked_step(curate: Mapping[str, Any], unique: int) -> list[dict[str, Any]]:
    """The funnel's ``blocked`` step (blocklists act at download, before it ends), when
    something was blocked."""
    removed = curate["blocked_url"] + curate["blocked_image"]
    if not removed:
        return []
    return [{"step": "blocked", "count": unique - removed, "removed": removed}]


def curation_steps(curate: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The funnel's steps after ``embedded``: each filter (what is left, what it removed), then ``kept``."""
    if curate["kept"] is None:
        return []
    steps, left = [], curate["embedded"]
    for step, count in filters_of(curate):
        left -= curate[count] or 0
        steps.append({"step": step, "count": left, "removed": curate[count] or 0})
    return [*steps, {"step": "kept", "count": curate["kept"]}]


def filters_of(curate: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The filters of a curation that were set or removed something (a default run shows
    none: its funnel goes from embedded to kept)."""
    shown = {
        "blocked_after_download": bool(curate.get("blocked_after_download")),
        "below_clip_score": curate["min_clip_score"] is not None or bool(curate["below_clip_score"]),
        "classifier": bool(curate["classifier_name"] or curate["classifier"]),
        "near_duplicates": curate["near_duplicate_threshold"] is not None or bool(curate["near_duplicates"]),
    }
    return [(step, count) for step, count in FILTERS if shown[count]]


def pair_thumbnails(layout: RunLayout, curate: Mapping[str, Any] | None) -> dict[str, str]:
    """Key -> a small JPEG thumbnail as a ``data:`` URI, for the samples of the pairs shown.

    A sample no current shard holds (a part removed since) gets none.
    """
    keys = sorted({k for p in (curate or {}).get("near_duplicate_pairs", []) for k in (p["key"], p["duplicate_of"])})
    if not keys:
        return {}
    shards = {shard_location(tar)[1]: tar for tar in layout.current_shards()}
    by_tar: dict[str, list[str]] = {}
    for key in keys:
        tar = next((shards[key[:n]] for n in sorted({len(s) for s in shards}) if key[:n] in shards), None)
        if tar is None:
            log.info("No current shard holds sample %s: no thumbnail", key)
            continue
        by_tar.setdefault(tar, []).append(key)
    thumbnails = {}
    for tar, tar_keys in by_tar.items():
        members = tar_member_offsets(layout, tar)
        fs, path = url_to_fs(tar)
        for key in tar_keys:
            found = next(((members[(key, ext)], ext) for ext in IMAGE_EXTENSIONS if (key, ext) in members), None)
            if found is None:
                log.info("Shard %s has no image of sample %s: no thumbnail", tar, key)
                continue
            (offset, size), ext = found
            uri = thumbnail_uri(fs.cat_file(path, start=offset, end=offset + size), f"{tar}:{key}.{ext}")
            if uri is not None:
                thumbnails[key] = uri
    return thumbnails


def tar_member_offsets(layout: RunLayout, tar: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(key, ext) -> (offset, size) in a tar: from build_index's offset table when it is of
    this tar (a small read), else from the tar's headers (a read of the whole tar)."""
    import pyarrow.parquet as pq

    from stages.index.search_files import tar_members

    table_url = layout.offsets_table(*shard_location(tar))
    if storage.exists(table_url):
        fs, path = url_to_fs(table_url)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        tar_fs, tar_path = url_to_fs(tar)
        if (table.schema.metadata or {}).get(b"tar_size") == str(tar_fs.size(tar_path)).encode():
            rows = table.to_pydict()
            return {(k, e): (o, s) for k, e, o, s in zip(rows["key"], rows["ext"], rows["offset"], rows["size"])}
    return {(k, e): (o, s) for k, e, o, s in tar_members(tar)}


def thumbnail_uri(image: bytes, name: str) -> str | None:
    """``image`` scaled to fit THUMBNAIL_PX, as a JPEG ``data:`` URI; None (and a warning
    naming the image) when it cannot be decoded: a thumbnail is not worth failing a report."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as opened:
            small = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        log.warning("No thumbnail: image %s in the shards cannot be decoded: %s", name, error)
        return None
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def histogram_svg(histogram: Mapping[str, list[float]], threshold: float | None) -> str:
    """The clip_score histogram as inline SVG bars, ``threshold`` (min_clip_score) a red line."""
    edges, counts = histogram["edges"], histogram["counts"]
    width, height, left, bottom = 760, 180, 40, 150
    low, high = edges[0], edges[-1]
    span = (high - low) or 1.0
    top = max(counts, default=0) or 1

    def x(value: float) -> float:
        return left + (width - left - 20) * (value - low) / span

    parts = []
    for count, start, end in zip(counts, edges, edges[1:]):
        h = (bottom - 10) * count / top
        parts.append(
            f'<rect class="bin" x="{x(start):.1f}" y="{bottom - h:.1f}" width="{max(1.0, x(end) - x(start) - 1):.1f}" '
            f'height="{h:.1f}" fill="#3b82f6"><title>{start:.3f} to {end:.3f}: {count:,}</title></rect>'
        )
    parts.append(f'<text x="{left}" y="{bottom + 16}">{low:.2f}</text><text x="{x(high)}" y="{bottom + 16}" text-anchor="end">{high:.2f}</text>')
    if threshold is not None:
        at = x(min(max(threshold, low), high))
        side = f'x="{at + 4:.1f}"' if at < width / 2 else f'x="{at - 4:.1f}" text-anchor="end"'  # stays inside the chart
        parts.append(
            f'<line class="threshold" x1="{at:.1f}" y1="0" x2="{at:.1f}" y2="{bottom}" stroke="#ef4444" stroke-width="2"/>'
            f'<text {side} y="12" fill="#ef4444">min_clip_score {threshold:g}</text>'
        )
    return (
        f'<svg id="clip-score-histogram" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="clip_score histogram">{"".join(parts)}</svg>'
    )


def render_curation(curate: Mapping[str, Any] | None, thumbnails: Mapping[str, str]) -> str:
    """report.html's curation section: counts by reason, the histogram, the pairs shown."""
    if not curate:
        return ""
    blocked_line = f'Blocklists: URLs never requested {curate["blocked_url"]:,}, images never written {curate["blocked_image"]:,}.'
    if curate["kept"] is None:
        return f"<h2>Curation</h2>\n<p>{html.escape(blocked_line)} Curation: {html.escape(str(curate['state']))}.</p>"
    removed = ", ".join(f'{step} {curate[count] or 0:,}' for step, count in filters_of(curate))
    shown = SETTINGS if curate["classifier_name"] else SETTINGS[:2]
    settings = ", ".join(f'{k} {"not set" if curate[k] is None else curate[k]}' for k in shown)
    histogram = curate.get("clip_score_histogram")
    chart = histogram_svg(histogram, curate["min_clip_score"]) if histogram else "<p>no clip_score histogram recorded</p>"
    figures = []
    for pair in curate["near_duplicate_pairs"]:
        images = "".join(
            f'<img src="{html.escape(thumbnails[k])}" alt="{html.escape(k)}">' if k in thumbnails else f'<span class="missing">{html.escape(k)}: no image</span>'
            for k in (pair["key"], pair["duplicate_of"])
        )
        caption = f'{pair["key"]} removed, a near-duplicate of {pair["duplicate_of"]} (kept); cosine {pair["cosine"]:.4f}'
        figures.append(f'<figure class="pair">{images}<figcaption>{html.escape(caption)}</figcaption></figure>')
    pairs = "".join(figures) or "<p>no near-duplicates removed</p>"
    return f"""<h2>Curation</h2>
<p>{html.escape(blocked_line)} Of {curate["embedded"]:,} embedded samples {curate["kept"]:,} were kept; removed: {html.escape(removed)} ({html.escape(settings)}).</p>
<h3>clip_score</h3>
{chart}
<h3>Removed near-duplicates</h3>
<div id="near-duplicate-pairs">{pairs}</div>"""
