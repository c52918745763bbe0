"""Raw metadata files, settings and part readers shared by the dedup tests."""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stages.dedup.settings import DedupSettings, RowPolicy

REFERENCE_COLUMNS = [
    ("SAMPLE_ID", pa.int64()),
    ("URL", pa.string()),
    ("TEXT", pa.string()),
    ("HEIGHT", pa.int32()),
    ("WIDTH", pa.int32()),
    ("LICENSE", pa.string()),
    ("NSFW", pa.string()),
    ("similarity", pa.float64()),
]
CAT = "a cat | sitting\non a mat"


def settings(partitions: int, **policy: Any) -> DedupSettings:
    return DedupSettings(dedup_partitions=partitions, policy=RowPolicy(**policy))


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]], delimiter: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, quotechar='"', lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]], delimiter: str = ",") -> None:
    data = csv_text(header, rows, delimiter).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)


def write_raw(raw: Path) -> None:
    """Four files with 16 rows: 4 without an http(s) URL, 2 without a caption, 3 duplicates, 7 to keep."""
    raw.mkdir(parents=True)
    full = ["SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity"]
    write_csv(raw / "a.csv", full, [
        [1, "http://x.org/1.jpg", CAT, 256, 256, "cc-by", "UNLIKELY", 0.31],
        [2, "https://x.org/2.jpg", "dog", "abc", 100, "?", "UNLIKELY", "not a number"],
        [3, "ftp://x.org/3.jpg", "ftp", 1, 1, "", "", 0.1],
        [4, "HTTP://X.org/4.jpg", "upper", 10, 10, "", "", 0.2],
        [5, "http://x.org/1.jpg", CAT, 256, 256, "cc-by", "UNLIKELY", 0.31],
        [6, "", "no url", 1, 1, "", "", 0.3],
    ], delimiter="|")  # fmt: skip
    write_csv(raw / "b.csv.gz", ["caption", "url", "width", "height", "sample_id", "extra"], [
        ["dog", "https://x.org/2.jpg", 5, 5, 20, "x"],
        ["a different caption", "http://x.org/1.jpg", 1, 2, 21, "x"],
        ["hello, world", "https://x.org/5.jpg", "12.0", 7, 22, "x"],
        ["data", "data:image/png;base64,AAAA", 1, 1, 23, "x"],
    ])  # fmt: skip
    write_csv(raw / "c.tsv", ["url", "TEXT", "similarity", "NSFW"], [
        ["https://x.org/6.jpg", "tab\tinside", "0.5", "NSFW"],
        ["https://x.org/7.jpg", "", "0.6", ""],
        ["https://x.org/7.jpg", "", "0.7", ""],
    ], delimiter="\t")  # fmt: skip
    pq.write_table(
        pa.table({
            "URL": ["http://x.org/8.jpg", "http://x.org/1.jpg", None],
            "TEXT": ["from parquet", CAT, "null url"],
            "SAMPLE_ID": pa.array([30, 31, 32], pa.int64()),
            "HEIGHT": pa.array([64, 65, 66], pa.int64()),
        }),
        raw / "d.parquet",
    )  # fmt: skip
    (raw / "_SUCCESS").write_bytes(b"")
    (raw / ".hidden.csv").write_text("not,data\n")


def read_parts(paths: Sequence[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in paths])


def column_types(path: Path) -> list[tuple[str, pa.DataType]]:
    return [(field.name, field.type) for field in pq.read_schema(path)]
