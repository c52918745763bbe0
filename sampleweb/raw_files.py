"""LAION-style raw metadata files: the header variants and how a file is written."""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

HEADER_FULL = ("SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity")
HEADER_SHORT = ("SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "similarity")
HEADER_REORDERED = (
    "URL", "TEXT", "similarity", "SAMPLE_ID", "WIDTH", "HEIGHT", "NSFW", "LICENSE", "language",
)


@dataclass(frozen=True)
class RawFileSpec:
    """How one raw file is laid out: its name under raw/, columns, delimiter, compression."""

    name: str
    header: tuple[str, ...]
    delimiter: str = "|"
    gzipped: bool = False

    def describe(self, rows: int) -> dict[str, object]:
        """The file's entry in expected.json."""
        return {
            "path": f"raw/{self.name}",
            "header": list(self.header),
            "delimiter": self.delimiter,
            "compression": "gzip" if self.gzipped else None,
            "rows": rows,
        }


RAW_FILE_SPECS = (
    RawFileSpec("part-00000.csv", HEADER_FULL),
    RawFileSpec("part-00001.csv", HEADER_SHORT),
    RawFileSpec("part-00002.csv", HEADER_REORDERED),
    RawFileSpec("part-00003.csv.gz", HEADER_FULL, gzipped=True),
    RawFileSpec("part-00004.csv", HEADER_SHORT, delimiter=","),
)


@dataclass(frozen=True)
class RawRow:
    """One metadata row as text. `url=None` writes a short row that stops before URL."""

    sample_id: str
    url: str | None
    text: str
    height: str
    width: str
    license: str
    nsfw: str
    similarity: str
    language: str

    def fields(self, header: tuple[str, ...]) -> list[str]:
        """The row's values in `header` order (cut short before URL when url is None)."""
        values = {
            "SAMPLE_ID": self.sample_id, "URL": self.url, "TEXT": self.text,
            "HEIGHT": self.height, "WIDTH": self.width, "LICENSE": self.license,
            "NSFW": self.nsfw, "similarity": self.similarity, "language": self.language,
        }
        if self.url is None:
            cut = header.index("URL")
            if cut == 0:
                raise ValueError(f"a row without a URL field cannot be written under {header}")
            return [str(values[column]) for column in header[:cut]]
        return [str(values[column]) for column in header]


def write_raw_file(path: Path, spec: RawFileSpec, rows: list[RawRow]) -> None:
    """Write `rows` under `spec`'s header with the csv module (QUOTE_MINIMAL, doubled quotes)."""
    text = io.StringIO(newline="")
    writer = csv.writer(
        text, delimiter=spec.delimiter, quoting=csv.QUOTE_MINIMAL, doublequote=True,
        lineterminator="\n",
    )
    writer.writerow(spec.header)
    writer.writerows(row.fields(spec.header) for row in rows)
    data = text.getvalue().encode("utf-8")
    if spec.gzipped:
        # mtime=0 and no stored file name keep the bytes identical from build to build.
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:
            gz.write(data)
        data = buffer.getvalue()
    path.write_bytes(data)
