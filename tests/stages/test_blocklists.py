"""Hash blocklists: real img2dataset against the sample web's server.

A blocked URL never reaches the server (its request log says so); a blocked image is
fetched, dropped before it is written and counted ``blocked_image``; bad lists fail with
the param, the file and the line, never the digest.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
import pytest

from operators.params import params_of
from sampleweb import SampleWebServer, build_sample_web
from stages.curate.blocklists import (
    BLOCKED_IMAGE,
    BlocklistSettings,
    blocked_counts,
    load_blocklist,
    validate_blocklists,
)
from stages.errors import InputError
from stages.images.download import DownloadSettings, download_part
from stages.images.retry import RetrySettings, retry_part
from stages.images.safe_fetch import FetchPolicy
from stages.layout import RunLayout
from stages.settings import settings_from

PART = "part-00000"


class Web:
    def __init__(self, root: Path, server: SampleWebServer, good_urls: list[str]) -> None:
        self.root, self.server, self.good_urls = root, server, good_urls

    def image_bytes(self, url: str) -> bytes:
        return (self.root / "www" / unquote(urlsplit(url).path).lstrip("/")).read_bytes()

    def requested(self) -> list[str]:
        return [f"{self.server.url}{r['path']}" for r in self.server.logged_requests()]


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    root = tmp_path_factory.mktemp("web")
    (root / "www").mkdir()
    with SampleWebServer(root / "www", log_path=tmp_path_factory.mktemp("log") / "requests.jsonl") as server:
        expected = build_sample_web(root, server.url, n_images=20, seed=0)
        urls = sorted({url for url, _ in expected["good_pairs"]})
        yield Web(root, server, urls)


def write_part(layout: RunLayout, urls: list[str]) -> None:
    rows = [
        {"SAMPLE_ID": i, "URL": url, "TEXT": f"caption {i}", "NSFW": "UNLIKELY", "similarity": 0.3, "LICENSE": "?"}
        for i, url in enumerate(urls)
    ]
    Path(layout.dedup).mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(layout.part(PART))


def download(layout: RunLayout, **blocklists: list[str]) -> dict:
    settings = DownloadSettings(
        processes_count=1, thread_count=4, number_sample_per_shard=100, timeout=5, image_size=64,
        fetch_policy=FetchPolicy(allowed_networks=("127.0.0.0/8",), max_retry_after_seconds=0),
        blocklists=BlocklistSettings(**blocklists),
        # Spawned workers (the list reaches them pickled): a fork of this long-lived test
        # process, which holds threads of earlier tests, hung once in the full suite.
        start_method="spawn",
    )  # fmt: skip
    return download_part(layout.part(PART), layout.part_images(PART), settings, dedup_version="v1")


def write_list(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tar_urls(folder: Path) -> list[str]:
    urls = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as archive:
            urls += [json.load(archive.extractfile(m))["url"] for m in archive.getmembers() if m.name.endswith(".json")]
    return sorted(urls)


def shard_rows(folder: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))], ignore_index=True)


def test_blocked_urls_are_never_requested_and_stay_counted(web: Web, tmp_path: Path) -> None:
    layout = RunLayout(str(tmp_path / "run"))
    urls = web.good_urls[:8]
    write_part(layout, urls)
    blocked = urls[:3]
    listed = write_list(tmp_path / "urls.txt", [
        sha256(blocked[0].encode()), "", md5(blocked[1].encode()), "  " + sha256(blocked[2].encode()).upper() + "  ",
        sha256(b"http://127.0.0.1/not-in-the-part.jpg"),
    ])  # fmt: skip

    numbers = download(layout, blocked_url_hashes=[listed])
    requested = web.requested()

    assert not set(blocked) & set(requested)
    assert set(urls[3:]) <= set(requested)
    assert numbers["blocked_url"] == 3 and numbers["count"] == 5 and numbers["successes"] == 5
    images = Path(layout.part_images(PART))
    assert tar_urls(images) == sorted(urls[3:])
    assert blocked_counts(layout, [PART]) == {"blocked_url": 3, "blocked_image": 0}

    # A rerun finds every shard done: nothing is requested, the count is still there.
    before = len(web.requested())
    again = download(layout, blocked_url_hashes=[listed])
    assert len(web.requested()) == before and again["blocked_url"] == 3
    assert blocked_counts(layout, [PART]) == {"blocked_url": 3, "blocked_image": 0}

    # A longer list: the part's shards were made without it, so they are made again.
    longer = write_list(tmp_path / "more.txt", [md5(urls[3].encode())])
    download(layout, blocked_url_hashes=[listed, longer])
    assert urls[3] not in web.requested()[before:]
    assert tar_urls(images) == sorted(urls[4:])
    assert blocked_counts(layout, [PART]) == {"blocked_url": 4, "blocked_image": 0}


def test_blocked_images_are_never_written_nor_retried(web: Web, tmp_path: Path) -> None:
    layout = RunLayout(str(tmp_path / "run"))
    urls = web.good_urls[8:16]
    write_part(layout, urls)
    blocked = urls[:2]
    listed = write_list(tmp_path / "images.txt", [sha256(web.image_bytes(blocked[0])), md5(web.image_bytes(blocked[1]))])

    numbers = download(layout, blocked_image_hashes=[listed])

    images = Path(layout.part_images(PART))
    assert tar_urls(images) == sorted(urls[2:])
    rows = shard_rows(images).set_index("url")
    assert set(rows.loc[blocked, "error_message"]) == {BLOCKED_IMAGE}
    assert set(rows.loc[blocked, "status"]) == {"failed_to_download"}
    assert numbers["errors"] == {BLOCKED_IMAGE: 2} and numbers["successes"] == 6
    assert blocked_counts(layout, [PART]) == {"blocked_url": 0, "blocked_image": 2}

    # The retry of failed samples leaves them alone: blocked_image is not a transient reason.
    before = len(web.requested())
    retried = retry_part(
        layout.part(PART), layout.part_images(PART),
        RetrySettings(download=DownloadSettings(
            processes_count=1, thread_count=2, fetch_policy=FetchPolicy(allowed_networks=("127.0.0.0/8",)),
            blocklists=BlocklistSettings(blocked_image_hashes=[listed]),
        )), dedup_version="v1",
    )  # fmt: skip
    assert retried["retried"] == 0 and len(web.requested()) == before
    assert blocked_counts(layout, [PART]) == {"blocked_url": 0, "blocked_image": 2}


def test_a_list_that_matches_nothing_counts_zero(web: Web, tmp_path: Path) -> None:
    layout = RunLayout(str(tmp_path / "run"))
    urls = web.good_urls[16:19]
    write_part(layout, urls)
    other = write_list(tmp_path / "other.txt", [sha256(b"elsewhere"), md5(b"elsewhere")])
    empty = write_list(tmp_path / "empty.txt", [])

    numbers = download(layout, blocked_url_hashes=[other, empty], blocked_image_hashes=[other, empty])

    assert numbers["blocked_url"] == 0 and numbers["successes"] == 3
    assert tar_urls(Path(layout.part_images(PART))) == sorted(urls)
    assert blocked_counts(layout, [PART]) == {"blocked_url": 0, "blocked_image": 0}
    assert validate_blocklists(BlocklistSettings([empty], [empty])) == {"blocked_url_hashes": 0, "blocked_image_hashes": 0}


def test_lists_are_read_over_http(web: Web, tmp_path: Path) -> None:
    digest = sha256(b"https://example.com/a.jpg")
    (web.root / "www" / "list.txt").write_text(f"{digest}\n{md5(b'x')}\n")
    blocklist = load_blocklist([f"{web.server.url}/list.txt"], "blocked_url_hashes")
    assert len(blocklist) == 2 and blocklist.matches_url("https://example.com/a.jpg")
    assert not blocklist.matches_url("https://example.com/b.jpg")


SECRET = "ab" * 31 + "c"  # 63 hex digits: most of a digest, which must never be printed


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ([sha256(b"a"), "", SECRET], "line 3: 63 hex digits"),
        ([md5(b"a"), "zz" * 16], "line 2: not a hex digest"),
        ([md5(b"a")[:-1]], "line 1: 31 hex digits"),
        ([sha256(b"a") + "0"], "line 1: 65 hex digits"),
        (["é" * 32], "line 1: not a hex digest"),
    ],
)
def test_a_bad_line_names_the_param_the_file_and_the_line(tmp_path: Path, lines: list[str], problem: str) -> None:
    path = write_list(tmp_path / "bad.txt", lines)
    with pytest.raises(InputError) as raised:
        validate_blocklists(BlocklistSettings(blocked_image_hashes=[path]))
    message = str(raised.value)
    assert message.startswith(f"blocked_image_hashes: {path} {problem}")
    assert SECRET not in message and "zz" not in message


def test_an_unreadable_list_names_the_param_and_the_file(tmp_path: Path) -> None:
    good = write_list(tmp_path / "good.txt", [sha256(b"a")])
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(InputError, match=f"^blocked_url_hashes: cannot read the blocklist {missing}: FileNotFoundError"):
        validate_blocklists(BlocklistSettings(blocked_url_hashes=[good, missing]))
    with pytest.raises(InputError, match=f"^blocked_url_hashes: cannot read the blocklist {tmp_path}: "):
        load_blocklist([str(tmp_path)], "blocked_url_hashes")


def test_the_lists_are_params_of_the_download() -> None:
    params = params_of(DownloadSettings)
    assert params["blocked_url_hashes"].value == [] and params["blocked_image_hashes"].value == []
    assert params["blocked_url_hashes"].schema["type"] == "array"
    assert set(params_of(RetrySettings)) >= {"blocked_url_hashes", "blocked_image_hashes"}
    settings = settings_from(DownloadSettings, {"blocked_url_hashes": ["s3://lists/urls.txt"], "blocked_image_hashes": "b.txt"})
    assert settings.blocklists == BlocklistSettings(("s3://lists/urls.txt",), ("b.txt",))
    with pytest.raises(InputError, match="blocked_url_hashes: every entry must be a file path or URL"):
        BlocklistSettings(blocked_url_hashes=[""])
