"""A part's name, its shard ids, and the state kept in its image folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.images.parts import (
    PARTIAL_DIR,
    RETRY_SHARD_BASE,
    SHARDS_PER_PART,
    claim_folder,
    first_shard_id,
    is_retry_shard,
    part_index,
    record_settings,
    recorded_dedup_version,
    recorded_settings,
    retry_shard_ids,
)


def test_part_index_and_shard_ranges_do_not_overlap() -> None:
    assert part_index("/x/dedup/part-00000.parquet") == 0
    assert part_index("s3://b/dedup/part-00042.parquet") == 42
    with pytest.raises(ValueError, match="notapart"):
        part_index("/x/notapart.parquet")
    assert SHARDS_PER_PART * 1 > 10**9 // 10**5  # a part holds up to 1e9 samples at 10k per shard


def test_retry_shards_take_the_second_half_of_the_part_range() -> None:
    part = "/x/dedup/part-00003.parquet"
    retries = retry_shard_ids(part)
    assert first_shard_id(part) == 300_000 and (retries.start, retries.stop) == (300_000 + RETRY_SHARD_BASE, 400_000)
    assert not is_retry_shard("/x/images/part-00003/0000300000") and is_retry_shard(f"{retries.start:010d}")
    assert not is_retry_shard(f"{retries.stop:010d}")  # the next part's first shard


def test_claiming_a_folder_keeps_its_version_and_clears_another(tmp_path: Path) -> None:
    folder = tmp_path / "images" / "part-00000"
    assert recorded_dedup_version(str(folder)) is None and recorded_settings(str(folder)) is None
    claim_folder(str(folder), "v1")
    record_settings(str(folder), {"image_size": 64})
    (folder / "0000000000.tar").write_bytes(b"shard")
    (folder / PARTIAL_DIR / "0000000001.tar").write_bytes(b"half")

    claim_folder(str(folder), "v1")  # a rerun: finished shards kept, the half-written one gone
    assert (folder / "0000000000.tar").exists() and not list((folder / PARTIAL_DIR).iterdir())
    assert recorded_dedup_version(str(folder)) == "v1" and recorded_settings(str(folder)) == {"image_size": 64}

    claim_folder(str(folder), "v2")  # another dedup output: its rows differ, nothing is kept
    assert not (folder / "0000000000.tar").exists() and recorded_settings(str(folder)) is None
    assert recorded_dedup_version(str(folder)) == "v2"
