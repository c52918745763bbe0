"""What build_index publishes for search (stages/index/search_files.py), over the plugin's finished run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.index.search_files import publish_search_files
from stages.layout import RunLayout

pytestmark = pytest.mark.heavy


def test_every_offset_points_at_its_member(search_run: dict, tar_samples: dict) -> None:
    import pyarrow.parquet as pq

    root = Path(search_run["output_root"])
    tables = sorted((root / "index" / "offsets").glob("part-*/*.parquet"))
    assert [t.relative_to(root / "index" / "offsets").with_suffix(".tar") for t in tables] == [
        t.relative_to(root / "images") for t in sorted((root / "images").glob("part-*/*.tar"))
    ]
    seen = 0
    for table in tables:
        tar = root / "images" / table.parent.name / f"{table.stem}.tar"
        data = tar.read_bytes()
        rows = pq.read_table(table).to_pylist()
        for row in rows:
            assert data[row["offset"] : row["offset"] + row["size"]] == tar_samples[row["key"]][row["ext"]]
        seen += len(rows)
    assert seen == 3 * search_run["expected"]["successes"]


def test_index_metadata_is_the_kept_samples_metadata(search_run: dict) -> None:
    root = Path(search_run["output_root"])
    published = sorted(p.name for p in (root / "index" / "metadata").iterdir())
    assert published == sorted(p.name for p in (root / "curated" / "metadata").glob("*.parquet"))
    for name in published:
        assert (root / "index" / "metadata" / name).read_bytes() == (root / "curated" / "metadata" / name).read_bytes()
    # With no filter (the run's defaults) every embedded sample is kept, in the embeddings' order.
    kept = pa.concat_tables(pq.read_table(p) for p in sorted((root / "index" / "metadata").iterdir()))
    embedded = pa.concat_tables(pq.read_table(p) for p in sorted((root / "embeddings" / "metadata").glob("*.parquet")))
    assert kept.column("key").to_pylist() == embedded.column("key").to_pylist()


def test_publishing_again_changes_nothing_and_missing_files_are_rebuilt(
    search_run: dict, tmp_path: Path, without_search_files: Callable[[Path], None]
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(search_run["output_root"], copy)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    assert publish_search_files(RunLayout(str(copy)))["skipped"] is True
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == before
    without_search_files(copy)
    numbers = publish_search_files(RunLayout(str(copy)))
    assert numbers["offset_tables_written"] == len(list(copy.glob("images/part-*/*.tar")))
    assert numbers["metadata_files_written"] == len(list(copy.glob("embeddings/metadata/*.parquet")))
