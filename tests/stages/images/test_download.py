"""A part's download: img2dataset through the download guard, against the hostile server
(every reason counted), with LAION-400M's img2dataset arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sampleweb.hostile import EXPECTED_REASONS, UNENDING, HostileServer
from stages.images.download import DownloadSettings, download_part, img2dataset_arguments
from stages.images.parts import SETTINGS_FILE, STATE_DIR
from stages.images.safe_fetch import FetchPolicy

BOUNDS = dict(max_download_seconds=4.0, max_image_bytes=2 * 1024 * 1024, max_redirects=3)


def hostile_part(server: HostileServer, folder: Path) -> tuple[Path, dict[str, str | None]]:
    expected = {server.url(p): reason for p, reason in EXPECTED_REASONS.items()}
    expected[server.url("/truncated.jpg")] = "Image decoding error"  # passes the guard, fails to decode
    rows = [
        {"SAMPLE_ID": i, "URL": url, "TEXT": f"caption {i}", "NSFW": "UNLIKELY", "similarity": 0.3, "LICENSE": "?"}
        for i, url in enumerate(sorted(expected))
    ]
    part = folder / "part-00000.parquet"
    pd.DataFrame(rows).to_parquet(part)
    return part, expected


def shard_rows(images: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(images.glob("*.parquet"))], ignore_index=True)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_every_hostile_url_gets_its_own_status(tmp_path: Path, start_method: str) -> None:
    with HostileServer(trickle_seconds=30) as server:
        part, expected = hostile_part(server, tmp_path)
        settings = DownloadSettings(
            processes_count=1, thread_count=16, number_sample_per_shard=100, timeout=2,
            fetch_policy=FetchPolicy(allowed_networks=("127.0.0.0/8",), **BOUNDS), start_method=start_method,
        )
        numbers = download_part(str(part), str(tmp_path / "images"), settings, dedup_version="test")
        # Every bound held: the workers hung up on the answers that do not end (the trickle
        # lasts 30 s) rather than waiting them out.
        hung_up = {path: server.wait_for_hang_up(path) for path in UNENDING}
    assert hung_up == dict.fromkeys(UNENDING, True)
    rows = shard_rows(tmp_path / "images")
    got = {row.url: (row.error_message if row.status != "success" else None) for row in rows.itertuples()}
    assert got == expected
    failures = {reason: list(expected.values()).count(reason) for reason in set(expected.values()) if reason}
    assert numbers["errors"] == failures
    assert numbers["successes"] == 2 and numbers["failed_to_resize"] == 1
    # What a retry of failed samples will reuse.
    recorded = json.loads((tmp_path / "images" / STATE_DIR / SETTINGS_FILE).read_text())
    assert recorded == {"image_size": 256, "resize_mode": "border", "number_sample_per_shard": 100, "encode_quality": 95}


def test_no_request_reaches_loopback_unless_allowed(tmp_path: Path) -> None:
    with HostileServer() as server:
        part, expected = hostile_part(server, tmp_path)
        settings = DownloadSettings(processes_count=1, thread_count=4, number_sample_per_shard=100, timeout=2)
        numbers = download_part(str(part), str(tmp_path / "images"), settings, dedup_version="test")
        requests = sum(server.requests.values())
    assert requests == 0
    assert numbers["errors"] == {"refused_private_address": len(expected)}
    assert set(shard_rows(tmp_path / "images")["error_message"]) == {"refused_private_address"}


def test_an_unknown_start_method_is_refused() -> None:
    with pytest.raises(ValueError, match="'threads' is not one of fork, forkserver, spawn"):
        DownloadSettings(start_method="threads")


def test_img2dataset_arguments_follow_laion_400m() -> None:
    args = img2dataset_arguments("/r/dedup/part-00001.parquet", "/r/images/part-00001", DownloadSettings())
    assert args["image_size"] == 256 and args["resize_mode"] == "border"
    assert (args["url_col"], args["caption_col"]) == ("URL", "TEXT")
    assert {"NSFW", "similarity", "LICENSE"} <= set(args["save_additional_columns"])
    assert args["output_format"] == "webdataset" and args["input_format"] == "parquet"
    assert args["incremental_mode"] == "incremental" and args["enable_wandb"] is False


def test_a_part_with_more_shards_than_its_range_holds_is_refused(tmp_path: Path) -> None:
    part = tmp_path / "part-00000.parquet"
    pd.DataFrame({"URL": [f"http://example.com/{i}.jpg" for i in range(50_001)], "TEXT": "t"}).to_parquet(part)
    settings = DownloadSettings(number_sample_per_shard=1, processes_count=1)
    with pytest.raises(ValueError, match="needs 50001 shards of 1 samples; a part holds at most 50000"):
        download_part(str(part), str(tmp_path / "images"), settings, dedup_version="v1")
    assert not (tmp_path / "images").exists()
