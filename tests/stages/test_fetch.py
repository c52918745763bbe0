from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from sampleweb.serve import SampleWebServer
from stages.fetch import expand_sources, fetch_metadata


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_globs_paths_and_file_urls_expand_to_files(tmp_path: Path) -> None:
    write(tmp_path / "src" / "a.csv", "URL|TEXT\n")
    write(tmp_path / "src" / "b.csv", "URL|TEXT\n")
    write(tmp_path / "other" / "c.parquet", "x")
    sources = expand_sources([str(tmp_path / "src" / "*.csv"), f"file://{tmp_path / 'other' / 'c.parquet'}"])
    assert [s.name.split("-", 1)[1] for s in sources] == ["a.csv", "b.csv", "c.parquet"]
    assert all(s.size is not None for s in sources)


def test_same_basename_from_two_places_keeps_both(tmp_path: Path) -> None:
    write(tmp_path / "x" / "part.csv", "1")
    write(tmp_path / "y" / "part.csv", "22")
    names = [s.name for s in expand_sources([str(tmp_path / "x" / "part.csv"), str(tmp_path / "y" / "part.csv")])]
    assert len(set(names)) == 2 and all(n.endswith("-part.csv") for n in names)


def test_a_source_that_matches_nothing_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_sources([str(tmp_path / "nothing-here" / "*.csv")])
    with pytest.raises(ValueError, match="empty"):
        expand_sources([])


def test_fetch_copies_then_skips_files_of_the_same_size(tmp_path: Path) -> None:
    src = write(tmp_path / "src" / "a.csv", "URL|TEXT\nhttp://x|y\n")
    gz = tmp_path / "src" / "b.csv.gz"
    gz.write_bytes(gzip.compress(b"URL,TEXT\n"))
    raw = tmp_path / "raw"
    first = fetch_metadata([str(tmp_path / "src" / "*")], str(raw))
    assert first["files_fetched"] == 2 and first["files_skipped"] == 0
    fetched = {p.name.split("-", 1)[1]: p for p in raw.iterdir()}
    assert fetched["a.csv"].read_bytes() == src.read_bytes()
    assert fetched["b.csv.gz"].read_bytes() == gz.read_bytes()
    second = fetch_metadata([str(tmp_path / "src" / "*")], str(raw))
    assert second["files_fetched"] == 0 and second["files_skipped"] == 2
    src.write_text("URL|TEXT\nhttp://x|a longer caption\n")
    third = fetch_metadata([str(tmp_path / "src" / "*")], str(raw))
    assert third["files_fetched"] == 1
    assert fetched["a.csv"].read_bytes() == src.read_bytes()
    assert not [p for p in raw.iterdir() if p.name.startswith(".")]


def test_fetch_over_http_from_a_local_server(tmp_path: Path) -> None:
    www = tmp_path / "www"
    write(www / "meta" / "laion.csv", "URL|TEXT\nhttp://a|b\n")
    with SampleWebServer(www) as server:
        numbers = fetch_metadata([f"{server.url}/meta/laion.csv"], str(tmp_path / "raw"))
    assert numbers["files_fetched"] == 1
    (copy,) = (tmp_path / "raw").iterdir()
    assert copy.name.endswith("-laion.csv") and copy.read_text() == "URL|TEXT\nhttp://a|b\n"
