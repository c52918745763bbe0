"""A small curated dataset built by hand, for the subset export's tests: shards of real tar
members (jpg, txt, json and one extra file), their parquet, and the curation's decisions
as the curate stage writes them (contract of #15)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path
from typing import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from stages.layout import RunLayout

# part -> shard -> (downloaded sample indexes, failed ones); a key is <shard><2-digit index>.
SHARDS = {
    "part-00000": {"0000000000": ([0, 1, 2, 3], [4]), "0000000001": ([0, 1, 2], [])},
    "part-00001": {"0000100000": ([0, 1, 2], [3])},
}
EXTRA = {"000010000001": "npy"}  # a sample with a file besides jpg, txt and json
DECISIONS_SCHEMA = pa.schema(
    [("key", pa.string()), ("clip_score", pa.float32()), ("classifier_score", pa.float32()), ("sha256", pa.string()),
     ("near_duplicate_of", pa.string()), ("near_duplicate_cosine", pa.float32()), ("reason", pa.string())]
)  # fmt: skip

Samples = dict[str, dict[str, bytes]]  # key -> extension -> bytes


def build_dataset(root: Path) -> Samples:
    """Write the dataset's dedup marker and shards under ``root``; returns every downloaded sample's files."""
    layout = RunLayout(str(root))
    parts = [f"{part}.parquet" for part in SHARDS]
    layout.dedup_marker.mark_done({"input_fingerprint": "d"}, {"parts": parts, "batches": [{"batch": 0, "version": "v0", "parts": parts}]})
    rng = random.Random(15)
    samples: Samples = {}
    for part, shards in SHARDS.items():
        folder = Path(layout.part_images(part))
        folder.mkdir(parents=True)
        for shard, (ok, failed) in shards.items():
            rows = []
            with tarfile.open(folder / f"{shard}.tar", "w") as tar:
                for index in ok:
                    key = f"{shard}{index:02d}"
                    files = {"jpg": rng.randbytes(200 + rng.randrange(300)), "txt": f"caption of {key}".encode()}
                    files["json"] = json.dumps({"key": key, "url": f"http://x/{key}.jpg", "caption": f"caption of {key}"}).encode()
                    if key in EXTRA:
                        files[EXTRA[key]] = rng.randbytes(64)
                    for ext, data in files.items():
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime = len(data), 1_600_000_000 + index
                        tar.addfile(info, io.BytesIO(data))
                    samples[key] = files
                    rows.append({"key": key, "status": "success", "error_message": None, "url": f"http://x/{key}.jpg"})
            for key in (f"{shard}{index:02d}" for index in failed):
                rows.append({"key": key, "status": "failed_to_download", "error_message": "http_404", "url": f"http://x/{key}.jpg"})
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard}.parquet")
            (folder / f"{shard}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(ok)}))
    return samples


def write_decisions(root: Path, reasons: Mapping[str, str | None]) -> None:
    """The curation's decisions for ``reasons`` (key -> reason, None = kept): one file per
    partition (one per shard here: ``<part>_<k>``), then the curation marker."""
    layout = RunLayout(str(root))
    for part, shards in SHARDS.items():
        for k, shard in enumerate(shards):
            keys = sorted(key for key in reasons if key.startswith(shard))
            rows = [{"key": key, "clip_score": 0.5, "classifier_score": None, "sha256": "0" * 64, "near_duplicate_of": None,
                     "near_duplicate_cosine": None, "reason": reasons[key]} for key in keys]  # fmt: skip
            url = Path(layout.decisions_file(f"{part}_{k:05d}"))
            url.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=DECISIONS_SCHEMA), url)
    kept = sum(reason is None for reason in reasons.values())
    layout.curation_marker.mark_done({"input_fingerprint": "e"}, {"embedded": len(reasons), "kept": kept})


def read_subset(root: Path) -> Samples:
    """Every sample's files in the subset's tars, by key; a key in two tars fails."""
    found: Samples = {}
    for path in sorted((root / "subset").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                assert ext not in found.get(key, {}), f"{member.name} twice in the subset"
                found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return found
