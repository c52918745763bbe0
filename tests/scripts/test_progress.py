"""scripts/progress.py: stage lines from XCom numbers, progress from a real output folder, the log redirection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from progress import (  # noqa: E402
    DownloadProgress, EmbeddingsProgress, done_line, progress_of, tail, task_label,
)  # fmt: skip


def write_part(root: Path, part: str, rows: int) -> None:
    (root / "dedup").mkdir(parents=True, exist_ok=True)
    table = pa.table({"URL": [f"http://x/{i}.jpg" for i in range(rows)], "TEXT": ["a cat"] * rows})
    pq.write_table(table, root / "dedup" / f"{part}.parquet")


def write_shard(root: Path, part: str, shard: str, count: int, *, finished: bool = True) -> None:
    folder = root / "images" / part
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{shard}.tar").write_bytes(b"\0" * 512)
    if finished:  # img2dataset writes a shard's stats last
        (folder / f"{shard}_stats.json").write_text(json.dumps({"count": count, "successes": count - 1}))


def test_a_stage_line_says_what_the_stage_did() -> None:
    numbers = {"rows_in": 165, "rows_invalid": 10, "rows_out": 155, "partitions": 2, "started_at": 1.0, "ended_at": 22.3, "seconds": 21.3}
    assert done_line("dedup", "dedup", numbers, elapsed=99.0) == "dedup done in 21.3 s: 165 rows in, 10 invalid, 155 unique"
    batch = {"batch": 1, "rows_in": 40, "rows_out": 31, "duplicates_of_earlier_batches": 9}
    grown = {**numbers, "rows_in": 205, "rows_out": 186, "batches": 2, "added_batch": batch}
    assert done_line("dedup", "dedup", grown, elapsed=99.0) == (
        "dedup done in 21.3 s: batch 1: 40 rows in, 31 new unique, 9 already in the dataset; 186 unique in all"
    )
    assert done_line("dedup", "dedup", {**grown, "added_batch": None}, elapsed=99.0) == (
        "dedup done in 21.3 s: no new raw file: 186 unique pairs in 2 batches"
    )


def test_a_mapped_download_line_names_its_part() -> None:
    numbers = {"count": 78, "successes": 70, "failed_to_download": 6, "failed_to_resize": 2, "errors": {}, "bytes": 1, "seconds": 9.81}
    label = task_label("download_images", 1, "part-00001")
    assert done_line(label, "download_images", numbers, elapsed=0.0) == (
        "download_images[part-00001] done in 9.8 s: 70/78 downloaded, 6 failed to download, 2 to resize"
    )


def test_a_list_value_and_a_stage_without_a_describer() -> None:
    assert done_line("list_dedup_parts", "list_dedup_parts", ["part-00000", "part-00001"], elapsed=0.42) == (
        "list_dedup_parts done in 0.4 s: 2 parts to download"
    )
    numbers = {"retried": 4, "recovered": 3, "reasons": ["timeout"], "seconds": 2.0, "started_at": 5.0}
    assert done_line("retry_failed[part-00000]", "retry_failed", numbers, elapsed=0.0) == (
        "retry_failed[part-00000] done in 2.0 s: retried 4, recovered 3"
    )


def test_a_skipped_stage_says_so() -> None:
    numbers = {"count": 155, "text_count": 155, "dim": 512, "device": "cpu", "skipped": True, "seconds": 0.2}
    assert done_line("clip_embeddings", "clip_embeddings", numbers, elapsed=0.0) == (
        "clip_embeddings done in 0.2 s: 155 image and 155 text embeddings of dim 512 on cpu (unchanged inputs: skipped)"
    )


def test_download_progress_counts_the_finished_shards_of_the_part(tmp_path: Path) -> None:
    write_part(tmp_path, "part-00001", rows=78)
    progress = DownloadProgress(str(tmp_path), "part-00001")
    assert progress() == (0, 78)

    write_shard(tmp_path, "part-00001", "0000100000", 50)
    write_shard(tmp_path, "part-00001", "0000100001", 28, finished=False)
    write_shard(tmp_path, "part-00002", "0000200000", 50)  # another part's shard
    assert progress() == (50, 78)

    write_shard(tmp_path, "part-00001", "0000100001", 28)
    write_shard(tmp_path, "part-00001", "0000150000", 6)  # a retry of failed samples: rows counted already
    assert progress() == (78, 78)


def test_embeddings_progress_counts_finished_partitions_of_the_parts_plan(tmp_path: Path) -> None:
    embeddings = tmp_path / "embeddings"
    progress = EmbeddingsProgress(str(tmp_path), "part-00001")
    assert progress() is None  # not planned yet

    (embeddings / "_plans").mkdir(parents=True)
    plan = {"part": "part-00001", "clip_model": "m", "partitions": [{"name": f"part-00001_{i:05d}", "tars": [], "fingerprint": str(i)} for i in range(3)]}
    (embeddings / "_plans" / "part-00001.json").write_text(json.dumps(plan))
    assert progress() == (0, 3)
    (embeddings / "_done").mkdir()
    for name in ("part-00001_00000", "part-00001_00002", "part-00000_00001"):  # the last: another part's
        (embeddings / "_done" / name).touch()
    assert progress() == (2, 3)


def test_only_long_stages_on_local_roots_have_progress(tmp_path: Path) -> None:
    download = SimpleNamespace(task_id="download_images", output_root=str(tmp_path), part="part-00000")
    assert isinstance(progress_of(download), DownloadProgress)
    assert isinstance(progress_of(SimpleNamespace(task_id="clip_embeddings", output_root=str(tmp_path), part="part-00000")), EmbeddingsProgress)
    assert progress_of(SimpleNamespace(task_id="dedup", output_root=str(tmp_path))) is None
    assert progress_of(SimpleNamespace(task_id="download_images", output_root="s3://bucket/run", part="part-00000")) is None


REDIRECTED_RUN = """
import subprocess, sys
from pathlib import Path
from progress import output_to

print("before the run")
with output_to(Path(sys.argv[1])) as console:
    print("from python")
    print("a python error", file=sys.stderr)
    subprocess.run(["sh", "-c", "echo from a child; echo child error >&2"], check=True)
    console.line("dedup started")
print("after the run")
"""


def test_output_of_the_process_and_its_children_goes_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    env = {"PYTHONPATH": str(REPO / "scripts"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", REDIRECTED_RUN, str(log)], env=env, capture_output=True, text=True, check=True)

    terminal = run.stdout.splitlines()
    assert terminal[0] == "before the run" and terminal[1].endswith(" dedup started") and terminal[2:] == ["after the run"]
    assert run.stderr == ""
    logged = log.read_text().splitlines()
    assert logged[:4] == ["from python", "a python error", "from a child", "child error"]
    assert logged[4] == terminal[1]


def test_tail_ends_where_asked(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, 3) == ["line 97", "line 98", "line 99"]
    end = len("".join(f"line {i}\n" for i in range(50)))
    assert tail(log, 2, end) == ["line 48", "line 49"]
