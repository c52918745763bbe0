"""The subset export over a small dataset built by hand (tests/curated_dataset.py): exactly
the selected samples with every file of each, byte for byte; reruns skip unchanged shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from curated_dataset import build_dataset, read_subset, write_decisions
from moto_s3 import moto_bucket
from shard_files import snapshot
from stages.curate.export import ExportSettings, export_subset
from stages.errors import InputError, StageNotFinished
from stages.layout import RunLayout

REMOVED = {"000000000001": "below_clip_score", "000000000003": "near_duplicate", "000010000002": "classifier"}


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, dict]:
    samples = build_dataset(tmp_path)
    write_decisions(tmp_path, {key: REMOVED.get(key) for key in samples})
    return tmp_path, samples


def export(root: Path, **settings) -> dict:
    return export_subset(RunLayout(str(root)), ExportSettings(**{"export_workers": 3, **settings}))


def test_subset_holds_exactly_the_kept_samples_and_every_file_of_each(dataset) -> None:
    root, samples = dataset
    numbers = export(root)

    kept = {key: files for key, files in samples.items() if key not in REMOVED}
    assert read_subset(root) == kept  # every member of each kept sample, byte-identical, the extra .npy too
    assert "npy" in read_subset(root)["000010000001"]
    shards = ("0000000000", "0000000001", "0000100000")  # one per source shard keeping a sample
    files = ["_SUCCESS.json"] + [f"{s}{suffix}" for s in shards for suffix in (".tar", ".parquet", "_stats.json")]
    assert sorted(p.name for p in (root / "subset").iterdir()) == sorted(files)
    for shard in shards:
        keys = {k for k in kept if k.startswith(shard)}
        rows = pq.read_table(root / "subset" / f"{shard}.parquet").to_pylist()
        assert {r["key"] for r in rows} == keys and all(r["status"] == "success" for r in rows)
        assert json.loads((root / "subset" / f"{shard}_stats.json").read_text())["count"] == len(keys)
    marker = json.loads((root / "subset" / "_SUCCESS.json").read_text())
    assert {k: marker[k] for k in ("shards", "samples", "source_shards", "selected_by", "keys_not_found")} == {
        "shards": 3, "samples": len(kept), "source_shards": 3, "selected_by": "curation", "keys_not_found": 0,
    }  # fmt: skip
    assert numbers["shards_written"] == 3 and numbers["samples"] == len(kept)


def test_a_rerun_writes_nothing(dataset) -> None:
    root, _ = dataset
    export(root)
    before = snapshot(root / "subset")
    numbers = export(root, export_workers=1)
    assert snapshot(root / "subset") == before
    assert numbers["shards_written"] == 0 and numbers["shards_removed"] == 0


def test_a_changed_selection_rewrites_only_the_shards_it_changes(dataset) -> None:
    root, samples = dataset
    export(root)
    before = snapshot(root / "subset")
    reasons = {key: REMOVED.get(key) for key in samples}
    reasons["000000000000"] = "below_clip_score"  # shard 0000000000 loses a sample
    reasons.update({key: "near_duplicate" for key in samples if key.startswith("0000000001")})  # 0000000001 loses all
    write_decisions(root, reasons)

    numbers = export(root)
    after = snapshot(root / "subset")
    assert read_subset(root) == {key: files for key, files in samples.items() if reasons[key] is None}
    assert {name for name in after if name.startswith("0000100000")} == {"0000100000.tar", "0000100000.parquet", "0000100000_stats.json"}
    assert all(after[name] == before[name] for name in after if name.startswith("0000100000"))  # untouched
    assert after["0000000000.tar"] != before["0000000000.tar"]
    assert not any(name.startswith("0000000001") for name in after)  # its outputs are removed
    assert (numbers["shards_written"], numbers["shards_removed"], numbers["shards"]) == (1, 1, 2)
    assert json.loads((root / "subset" / "_SUCCESS.json").read_text())["samples"] == sum(r is None for r in reasons.values())


def test_a_shard_left_unfinished_is_redone_alone(dataset) -> None:
    root, _ = dataset
    export(root)
    before = snapshot(root / "subset")
    (root / "subset" / "0000000001_stats.json").unlink()  # as if killed before its stats were written

    numbers = export(root)
    after = snapshot(root / "subset")
    assert numbers["shards_written"] == 1
    assert after["0000000001.tar"][0] == before["0000000001.tar"][0]
    assert all(after[name] == before[name] for name in after if not name.startswith(("0000000001", "_SUCCESS")))


def test_an_allowlist_selects_its_keys_and_counts_those_not_found(tmp_path: Path) -> None:
    samples = build_dataset(tmp_path)  # no curation: an allowlist does not need one
    listed = ["000000000002", "000010000001", "000000000004", "999999999999", "0000000001", "000010000001"]
    allowlist = tmp_path / "keys.txt"
    allowlist.write_text("\n".join(listed) + "\n\n")  # a failed sample, an unknown key, a shard name, a repeat, a blank line

    numbers = export(tmp_path, subset_keys=str(allowlist))
    assert read_subset(tmp_path) == {key: samples[key] for key in ("000000000002", "000010000001")}
    assert (numbers["selected_by"], numbers["selected"], numbers["samples"], numbers["keys_not_found"]) == ("allowlist", 5, 2, 3)
    marker = json.loads((tmp_path / "subset" / "_SUCCESS.json").read_text())
    assert marker["selected_by"] == "allowlist" and marker["subset_keys"] == str(allowlist) and marker["shards"] == 2


def test_an_allowlist_never_exports_a_sample_a_hash_list_names(tmp_path: Path) -> None:
    """A sample the curation took out because a blocklist grew after its download is still
    in its tar; listing its key does not export it."""
    samples = build_dataset(tmp_path)
    keys = sorted(k for k in samples)[:3]
    write_decisions(tmp_path, {keys[0]: None, keys[1]: "blocked_image", keys[2]: "below_clip_score"})
    allowlist = tmp_path / "keys.txt"
    allowlist.write_text("\n".join(keys) + "\n")
    numbers = export(tmp_path, subset_keys=str(allowlist))
    assert sorted(read_subset(tmp_path)) == [keys[0], keys[2]]  # a score filter does not bind a list; a hash list does
    assert (numbers["selected"], numbers["samples"], numbers["keys_not_found"]) == (3, 2, 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"subset_keys: cannot read .*missing\.txt"),
        ("000000000002\n0000 00000003\n", r"subset_keys: .*keys\.txt line 2: expected one sample key"),
        ("\n  \n", r"subset_keys: .*keys\.txt lists no key"),
        (b"\xff\xfe\x00", r"subset_keys: cannot read .*keys\.txt"),
    ],
)
def test_an_unreadable_allowlist_fails_before_any_work(dataset, content, message: str) -> None:
    root, _ = dataset
    allowlist = root / ("missing.txt" if content is None else "keys.txt")
    if isinstance(content, bytes):
        allowlist.write_bytes(content)
    elif content is not None:
        allowlist.write_text(content)
    with pytest.raises(InputError, match=message):
        export(root, subset_keys=str(allowlist))
    assert not (root / "subset").exists()


def test_without_an_allowlist_the_curation_must_have_finished(tmp_path: Path) -> None:
    build_dataset(tmp_path)
    with pytest.raises(StageNotFinished, match=r"subset_keys is null.*curation/_SUCCESS\.json does not exist"):
        export(tmp_path)


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="export_workers"):
        ExportSettings(export_workers=0)
    with pytest.raises(ValueError, match="subset_keys"):
        ExportSettings(subset_keys=" ")


@pytest.fixture
def s3_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty bucket on a moto S3 server on loopback, as fsspec's default s3 store."""
    with moto_bucket(monkeypatch, "export-test"):
        yield "s3://export-test/run"


def test_the_subset_of_a_dataset_on_s3(dataset, s3_root: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    local, samples = dataset
    s3, bucket_root = fsspec.filesystem("s3"), s3_root.removeprefix("s3://")
    s3.put(f"{local}/", bucket_root, recursive=True)
    s3.pipe(f"{bucket_root}/keys.txt", b"000000000000\n000010000001\n")

    def subset_read_back() -> dict:
        copy = tmp_path_factory.mktemp("from-s3")
        s3.get(f"{bucket_root}/subset/", f"{copy}/subset/", recursive=True)
        return read_subset(copy)

    curated, again = export(s3_root), export(s3_root)
    assert subset_read_back() == {key: files for key, files in samples.items() if key not in REMOVED}
    assert (curated["shards_written"], again["shards_written"], again["samples"]) == (3, 0, curated["samples"])

    listed = export(s3_root, subset_keys=f"{s3_root}/keys.txt")
    assert subset_read_back() == {key: samples[key] for key in ("000000000000", "000010000001")}
    assert (listed["selected_by"], listed["shards"], listed["shards_removed"]) == ("allowlist", 2, 1)
