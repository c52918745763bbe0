"""The sample web: deterministic build, real images, really broken URLs, true ground truth."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
from PIL import Image

from sampleweb import SampleWebServer, build_sample_web

N_IMAGES = 30
BASE_URL = "http://127.0.0.1:8000"
# Never let a proxy from the environment carry test traffic off this machine.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict, SampleWebServer]]:
    """A sample web built for, and served by, a running server."""
    root = tmp_path_factory.mktemp("web")
    log_path = tmp_path_factory.mktemp("log") / "requests.jsonl"
    (root / "www").mkdir()
    with SampleWebServer(root / "www", log_path=log_path) as server:
        expected = build_sample_web(root, server.url, n_images=N_IMAGES, seed=0)
        yield root, expected, server


def fetch(url: str) -> tuple[int, str | None, bytes]:
    try:
        with _OPENER.open(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def tree_digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*")) if path.is_file()
    }


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def read_with_pandas(root: Path, entry: dict) -> pd.DataFrame:
    frame = pd.read_csv(root / entry["path"], sep=entry["delimiter"], dtype=str, keep_default_na=False)
    return frame.fillna("")  # a row cut short before URL leaves NaN in its missing fields


def read_with_csv(root: Path, entry: dict) -> list[dict[str, str]]:
    path = root / entry["path"]
    opener = gzip.open if entry["compression"] == "gzip" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter=entry["delimiter"], restval=""))


def test_build_is_deterministic(tmp_path: Path) -> None:
    first = build_sample_web(tmp_path / "a", BASE_URL, n_images=20, seed=1)
    again = build_sample_web(tmp_path / "b", BASE_URL, n_images=20, seed=1)
    other = build_sample_web(tmp_path / "c", BASE_URL, n_images=20, seed=2)
    assert first == again
    assert tree_digests(tmp_path / "a") == tree_digests(tmp_path / "b")
    assert first["good_pairs"] != other["good_pairs"]
    assert tree_digests(tmp_path / "a" / "www") != tree_digests(tmp_path / "c" / "www")


def test_rebuild_replaces_an_earlier_web_and_refuses_other_directories(tmp_path: Path) -> None:
    build_sample_web(tmp_path / "web", BASE_URL, n_images=20, seed=1)
    rebuilt = build_sample_web(tmp_path / "web", BASE_URL, n_images=20, seed=2)
    served = {str(p.relative_to(tmp_path / "web" / "www")) for p in (tmp_path / "web" / "www").rglob("*.jpg")}
    assert {urlsplit(url).path.lstrip("/") for url, _ in rebuilt["good_pairs"]} <= served
    assert not any(urlsplit(b["url"]).path.lstrip("/") in served for b in rebuilt["broken_urls"]
                   if b["kind"] == "not_found")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_sample_web(tmp_path / "other", BASE_URL, n_images=20)


def test_images_are_distinct_decodable_and_varied(web: tuple[Path, dict, SampleWebServer]) -> None:
    root, expected, _ = web
    paths = {root / "www" / urlsplit(url).path.lstrip("/") for url, _ in expected["good_pairs"]}
    assert len(paths) == N_IMAGES
    assert len({hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}) == N_IMAGES
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.append(image.size)
    assert all(150 <= side <= 600 for size in sizes for side in size)
    assert any(width != height for width, height in sizes)


def test_good_urls_serve_jpegs(web: tuple[Path, dict, SampleWebServer]) -> None:
    _, expected, _ = web
    for url, _ in expected["good_pairs"][:5]:
        status, content_type, body = fetch(url)
        assert (status, content_type) == (200, "image/jpeg")
        Image.open(io.BytesIO(body)).load()


def test_broken_urls_are_broken_over_http(web: tuple[Path, dict, SampleWebServer]) -> None:
    _, expected, _ = web
    kinds = {broken["kind"] for broken in expected["broken_urls"]}
    assert kinds == {"not_found", "truncated", "html"}
    for broken in expected["broken_urls"]:
        status, content_type, body = fetch(broken["url"])
        if broken["kind"] == "not_found":
            assert status == 404
            continue
        assert (status, content_type) == (200, "image/jpeg")
        if broken["kind"] == "truncated":
            assert body.startswith(b"\xff\xd8") and len(body) == 300
        else:
            assert body.startswith(b"<!DOCTYPE html>")
        with pytest.raises(OSError):  # UnidentifiedImageError is an OSError too
            Image.open(io.BytesIO(body)).verify()


def test_counts_match_an_independent_reread(web: tuple[Path, dict, SampleWebServer]) -> None:
    root, expected, _ = web
    frames = [read_with_pandas(root, entry) for entry in expected["files"]]
    for entry, frame in zip(expected["files"], frames):
        assert list(frame.columns) == entry["header"]
        assert len(frame) == entry["rows"] == len(read_with_csv(root, entry))
    rows = pd.concat([frame[["URL", "TEXT"]] for frame in frames], ignore_index=True)
    valid = rows[rows["URL"].map(is_http)]
    pairs = set(zip(valid["URL"], valid["TEXT"]))
    assert len(rows) == expected["rows_in"]
    assert len(rows) - len(valid) == expected["rows_invalid"]
    assert len(pairs) == expected["rows_out"]
    good = {tuple(pair) for pair in expected["good_pairs"]}
    assert good <= pairs and len(good) == expected["successes"]
    kind_of = {broken["url"]: broken["kind"] for broken in expected["broken_urls"]}
    outcomes = [kind_of.get(url, "good") for url, _ in pairs]
    assert outcomes.count("not_found") + outcomes.count("html") == expected["failed_to_download"]
    assert outcomes.count("truncated") == expected["failed_to_resize"]
    assert expected["successes"] + expected["failed_to_download"] + expected["failed_to_resize"] == len(pairs)
    csv_pairs = {(row["URL"], row["TEXT"]) for entry in expected["files"] for row in read_with_csv(root, entry)
                 if is_http(row["URL"] or "")}
    assert csv_pairs == pairs


def test_raw_files_hold_the_edge_cases(web: tuple[Path, dict, SampleWebServer]) -> None:
    root, expected, _ = web
    files = expected["files"]
    assert len({tuple(entry["header"]) for entry in files}) >= 3
    assert {entry["delimiter"] for entry in files} == {"|", ","}
    assert any(entry["compression"] == "gzip" for entry in files)
    frames = [read_with_pandas(root, entry).assign(file=entry["path"]) for entry in files]
    rows = pd.concat(frames, ignore_index=True)
    captions = [text for _, text in expected["good_pairs"]]
    for has_case in (lambda t: "\n" in t, lambda t: "|" in t, lambda t: '"' in t, lambda t: not t.isascii(),
                     lambda t: "&#" in t or "&quot;" in t or "&amp;" in t, lambda t: len(t) > 1000):
        assert any(map(has_case, captions))
    assert (pd.Series([url for url, _ in expected["good_pairs"]]).value_counts() > 1).any()
    assert "abc" in set(rows["HEIGHT"]) and "n/a" in set(rows["similarity"])
    invalid = rows.loc[~rows["URL"].map(is_http), "URL"]
    assert any(url.startswith("ftp://") for url in invalid) and any(url.startswith("data:") for url in invalid)
    assert (invalid == "").sum() >= 2
    duplicated = rows[rows.duplicated(["URL", "TEXT"], keep=False) & rows["URL"].map(is_http)]
    files_per_pair = duplicated.groupby(["URL", "TEXT"])["file"].agg(["nunique", "size"])
    assert (files_per_pair["nunique"] > 1).any()  # duplicated across files
    assert (files_per_pair["size"] > files_per_pair["nunique"]).any()  # and within one file


def test_server_binds_loopback_and_logs_requests(web: tuple[Path, dict, SampleWebServer]) -> None:
    _, expected, server = web
    assert server.url == f"http://127.0.0.1:{server.port}"
    good_url = expected["good_pairs"][0][0]
    assert fetch(good_url)[0] == 200
    assert fetch(f"{server.url}/img/no-such-file.jpg")[0] == 404
    logged = server.logged_requests()
    good_path = urlsplit(good_url)._replace(scheme="", netloc="").geturl()  # path and query
    assert {"path": good_path, "status": 200}.items() <= logged[-2].items()
    assert {"path": "/img/no-such-file.jpg", "status": 404}.items() <= logged[-1].items()
    proc_tcp = Path("/proc/net/tcp")
    if proc_tcp.exists():  # Linux: the listening socket's local address is 127.0.0.1 only
        port_hex = f"{server.port:04X}"
        listening = [line.split() for line in proc_tcp.read_text().splitlines()[1:]]
        addresses = {fields[1].split(":")[0] for fields in listening
                     if fields[1].endswith(f":{port_hex}") and fields[3] == "0A"}
        assert addresses == {"0100007F"}


def test_server_reports_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="is not a directory"):
        with SampleWebServer(tmp_path / "missing"):
            pass


def test_cli_builds_and_prints_the_summary(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sampleweb", "build", "--root", str(tmp_path / "web"),
         "--base-url", BASE_URL, "--n-images", "20", "--seed", "3"],
        capture_output=True, text=True, check=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    summary = json.loads(result.stdout)
    expected = json.loads((tmp_path / "web" / "expected.json").read_text())
    assert summary["rows_in"] == expected["rows_in"] and summary["successes"] == len(expected["good_pairs"])
