"""Build the sample web: images under www/, raw LAION-style metadata under raw/, and
expected.json, the ground truth a pipeline run over raw/ should reproduce."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sampleweb.images import make_distinct_jpegs
from sampleweb.laion_rows import is_usable_caption, load_laion_rows
from sampleweb.raw_files import RAW_FILE_SPECS, RawRow, write_raw_file

logger = logging.getLogger(__name__)

MIN_IMAGES = 20
BROKEN_KINDS = ("not_found", "truncated", "html")
BROKEN_SHARE_PER_KIND = 0.045  # three kinds: about 12% of the rows point at a broken URL
TRUNCATED_BYTES = 300  # cuts a JPEG inside its Huffman tables: no decoder gets past the header
HTML_BODY = (
    "<!DOCTYPE html>\n<html><head><title>403 Hotlinking not allowed</title></head>\n"
    "<body><h1>This image is not available</h1>\n"
    "<p>Images on this site may not be embedded on other sites.</p></body></html>\n"
).encode()
# Rows a pipeline must reject: no http(s) URL. None writes a row cut short before URL.
INVALID_URLS: tuple[str | None, ...] = (
    "ftp://ftp.example.com/pub/photos/beach.jpg",
    "ftp://files.example.org/img/cat.jpg",
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==",
    "",
    "",
    None,
    "www.example.com/images/photo.jpg",
    "//cdn.example.com/images/photo.jpg",
)
SECOND_CAPTION_KINDS = ("good", "good", "good", "not_found", "truncated")
EXACT_DUPLICATES_WITHIN_FILE = 3
EXACT_DUPLICATES_ACROSS_FILES = 3
_MARKER = ".sampleweb"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class _Target:
    """A URL of the sample web and what it serves."""

    url: str
    kind: str  # "good" or one of BROKEN_KINDS
    width: int
    height: int


def build_sample_web(root: Path, base_url: str, n_images: int = 240, seed: int = 0) -> dict:
    """Write the sample web under `root` and return (and write) root/expected.json.

    `root` must be new, empty (an empty www/ is fine, so a server can already be serving
    it), or an earlier sample web, whose www/, raw/ and expected.json are replaced.
    URLs to download are `base_url` + a path under www/.
    """
    if n_images < MIN_IMAGES:
        raise ValueError(f"n_images must be at least {MIN_IMAGES}, got {n_images}")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    base_url = base_url.rstrip("/")
    root = Path(root)
    www, raw = _prepare_root(root)
    rng = random.Random(seed)
    n_broken = max(1, round(n_images * BROKEN_SHARE_PER_KIND))
    kinds = ["good"] * n_images + [kind for kind in BROKEN_KINDS for _ in range(n_broken)]
    pool = _laion_pool(rng)
    n_needed = len(kinds) + len(SECOND_CAPTION_KINDS) + len(INVALID_URLS) + 1
    if len(pool) < n_needed:
        raise ValueError(f"n_images={n_images} needs {n_needed} LAION rows, only {len(pool)} are usable")
    targets = _write_www(www, base_url, kinds, [url for url, _ in pool], seed, rng)
    captions = [text for _, text in pool]
    spare = iter(captions[len(targets):])
    pairs = list(zip(targets, captions))
    # A caption with an embedded newline; the CSV writer quotes it.
    newline_at = rng.randrange(10, n_images)
    pairs[newline_at] = (targets[newline_at], f"{pairs[newline_at][1]}\n{next(spare)}")
    # The same URL again with another caption: a distinct pair that counts on its own.
    for kind in SECOND_CAPTION_KINDS:
        target = rng.choice([t for t in targets if t.kind == kind])
        pairs.append((target, next(spare)))
    rows = [_raw_row(target.url, caption, target.width, target.height, rng) for target, caption in pairs]
    _spoil_numbers(rows, rng)
    rows += [_raw_row(url, next(spare), 0, 0, rng) for url in INVALID_URLS]
    files = _spread_over_files(rows, rng)
    for spec, file_rows in zip(RAW_FILE_SPECS, files):
        write_raw_file(raw / spec.name, spec, file_rows)
    expected = _ground_truth(targets, files, base_url, n_images, seed)
    (root / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    logger.info(
        "Built a sample web in %s: %s rows in, %s distinct pairs, %s good",
        root, expected["rows_in"], expected["rows_out"], expected["successes"],
    )
    return expected


def _prepare_root(root: Path) -> tuple[Path, Path]:
    www, raw = root / "www", root / "raw"
    root.mkdir(parents=True, exist_ok=True)
    if (root / _MARKER).exists():
        # Empty www/ and raw/ in place: a server may already be serving www/.
        for child in [*_children(www), *_children(raw)]:
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        (root / "expected.json").unlink(missing_ok=True)
    elif any(path not in (www, raw) or not path.is_dir() or _children(path) for path in root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and holds no earlier sample web; pass a new or empty directory"
        )
    (root / _MARKER).write_text("built by sampleweb.build_sample_web\n")
    www.mkdir(exist_ok=True)
    raw.mkdir(exist_ok=True)
    return www, raw


def _children(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if directory.is_dir() else []


def _laion_pool(rng: random.Random) -> list[tuple[str, str]]:
    """Usable LAION (URL, TEXT) rows: rare edge cases first, so they land on good URLs."""
    rows = [(u, t) for u, t in load_laion_rows().itertuples(index=False) if is_usable_caption(t)]
    entity = re.compile(r"&(#\d+|[a-z]+);")
    wanted = (  # (what makes the caption rare, how many to put first)
        (lambda t: len(t) > 1000, 1),
        (lambda t: not t.isascii(), 2),
        (lambda t: entity.search(t) is not None, 2),
        (lambda t: "|" in t, 1),
        (lambda t: '"' in t, 1),
    )
    special: list[tuple[str, str]] = []
    for is_rare, count in wanted:
        special += [row for row in rows if is_rare(row[1]) and row not in special][:count]
    rest = [row for row in rows if row not in special]
    rng.shuffle(rest)
    return special + rest


def _write_www(
    www: Path, base_url: str, kinds: list[str], laion_urls: list[str], seed: int, rng: random.Random
) -> list[_Target]:
    n_good = kinds.count("good")
    images = make_distinct_jpegs(n_good + kinds.count("truncated"), seed)
    spare_images = iter(images[n_good:])
    taken: set[str] = set()
    targets = []
    for i, kind in enumerate(kinds):
        path = _url_path(laion_urls[i], taken)
        body: bytes | None = None
        if kind == "good":
            body, width, height = images[i].data, images[i].width, images[i].height
        else:  # the size the metadata claims for an image nobody can fetch
            width, height = rng.randint(200, 1024), rng.randint(200, 1024)
        if kind == "truncated":
            body = next(spare_images).data[:TRUNCATED_BYTES]
        elif kind == "html":
            body = HTML_BODY
        if body is not None:  # not_found: nothing is written, so the server answers 404
            (www / path).parent.mkdir(parents=True, exist_ok=True)
            (www / path).write_bytes(body)
        query = f"?w={width}" if kind == "good" and rng.random() < 0.08 else ""
        targets.append(_Target(f"{base_url}/{path}{query}", kind, width, height))
    return targets


def _url_path(laion_url: str, taken: set[str]) -> str:
    """A filesystem-safe path `img/<host>/<dirs>/<name>.jpg` shaped like `laion_url`."""
    parts = urlsplit(laion_url)
    host = re.sub(r"[^a-z0-9.-]+", "-", (parts.hostname or "").lower()).strip(".-") or "unknown-host"
    segments = [segment for segment in unquote(parts.path).split("/") if segment]
    stem = _safe_name(segments[-1].rsplit(".", 1)[0]) if segments else ""
    dirs = [name for name in map(_safe_name, segments[-3:-1]) if name]
    base = "/".join(["img", host, *dirs, stem or "image"])
    path, copy = base, 1
    while path.lower() in taken:  # lower(): stay distinct on case-insensitive filesystems too
        copy += 1
        path = f"{base}-{copy}"
    taken.add(path.lower())
    return f"{path}.jpg"


def _safe_name(segment: str) -> str:
    return _UNSAFE.sub("-", segment).strip("-")[:40]


def _raw_row(url: str | None, caption: str, width: int, height: int, rng: random.Random) -> RawRow:
    # NSFW is never "NSFW" and similarity stays above LAION's 0.3 cut, so a pipeline that
    # applies those filters keeps every row and the ground truth holds either way.
    return RawRow(
        sample_id=str(rng.randrange(10**9, 10**10)),
        url=url,
        text=caption,
        height=str(height),
        width=str(width),
        license=rng.choice(["?", "?", "?", "creativecommons.org/licenses/by-sa/3.0/"]),
        nsfw=rng.choice(["UNLIKELY", "UNLIKELY", "UNLIKELY", "UNSURE"]),
        similarity=f"{rng.uniform(0.3, 0.45):.6f}",
        language=rng.choice(["en", "en", "en", "fr", "de", "es", ""]),
    )


def _spoil_numbers(rows: list[RawRow], rng: random.Random) -> None:
    """Make a few numbers unparseable; such a number must read as null, the row stays valid."""
    spoilt = ({"height": "abc"}, {"similarity": "n/a"}, {"width": ""}, {"similarity": ""})
    for index, change in zip(rng.sample(range(len(rows)), len(spoilt)), spoilt):
        rows[index] = replace(rows[index], **change)


def _spread_over_files(rows: list[RawRow], rng: random.Random) -> list[list[RawRow]]:
    """Shuffle rows over RAW_FILE_SPECS and add exact (URL, TEXT) duplicates."""
    cut_short = [row for row in rows if row.url is None]
    rows = [row for row in rows if row.url is not None]
    rng.shuffle(rows)
    n_files = len(RAW_FILE_SPECS)
    files = [rows[i::n_files] for i in range(n_files)]
    # A row cut short before URL needs a header where URL is not the first column.
    fits = [i for i, spec in enumerate(RAW_FILE_SPECS) if spec.header[0] != "URL"]
    for row in cut_short:
        chosen = files[rng.choice(fits)]
        chosen.insert(rng.randrange(len(chosen) + 1), row)
    for _ in range(EXACT_DUPLICATES_WITHIN_FILE):
        chosen = rng.choice(files)
        row = rng.choice([row for row in chosen if row.url is not None])
        chosen.insert(rng.randrange(len(chosen) + 1), row)  # the very same line again
    newline_row = next(row for row in rows if "\n" in row.text)
    others = [row for row in rows if row is not newline_row]
    picks = [newline_row] + rng.sample(others, EXACT_DUPLICATES_ACROSS_FILES - 1)
    for row in picks:
        home = next(i for i, file_rows in enumerate(files) if row in file_rows)
        other = files[rng.choice([i for i in range(n_files) if i != home])]
        copy = replace(row, sample_id=str(rng.randrange(10**9, 10**10)))
        other.insert(rng.randrange(len(other) + 1), copy)
    return files


def _ground_truth(
    targets: list[_Target], files: list[list[RawRow]], base_url: str, n_images: int, seed: int
) -> dict:
    """Count what was written: every row, the invalid ones, distinct pairs by outcome."""
    kind_of = {target.url: target.kind for target in targets}
    all_rows = [row for file_rows in files for row in file_rows]
    valid = [row for row in all_rows if row.url is not None and row.url.startswith(("http://", "https://"))]
    pairs = sorted({(row.url, row.text) for row in valid})
    outcome = [kind_of[url] for url, _ in pairs]
    return {
        "base_url": base_url,
        "seed": seed,
        "n_images": n_images,
        "rows_in": len(all_rows),
        "rows_invalid": len(all_rows) - len(valid),
        "rows_out": len(pairs),
        "successes": outcome.count("good"),
        # HTML served as image/jpeg is refused by the download guard (html_body); a
        # truncated JPEG passes the header check and fails in img2dataset's decoder.
        "failed_to_download": outcome.count("not_found") + outcome.count("html"),
        "failed_to_resize": outcome.count("truncated"),
        "files": [spec.describe(len(rows)) for spec, rows in zip(RAW_FILE_SPECS, files)],
        "broken_urls": [{"url": t.url, "kind": t.kind} for t in targets if t.kind != "good"],
        "good_pairs": [[url, text] for url, text in pairs if kind_of[url] == "good"],
    }
