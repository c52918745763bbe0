"""growth: a second batch added to a dataset in place vs the same dataset rebuilt from both batches.

N distinct JPEGs served by nginx on 127.0.0.1, in rows of LAION's shape (end_to_end's raw
CSV, 5% of rows repeated). The base file holds 10/11 of the images; the new file the other
1/11 (10% of the base) and, under new SAMPLE_IDs, 5% of the base's pairs again, so dedup
across batches has something to drop. Each repetition runs the DAG (`dag.test`, as `make
run`) three times: over the base file into a fresh root G (setup, not compared), again into
G with both files (``grow``), and over both files into a fresh root R (``rebuild``). Both
end with the same dataset: grow redoes nothing of the base (no dedup of its rows, no
download, no embedding), adds the new vectors to the base's index and pays every task's
start-up again; rebuild does all of it once.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.data import jpeg_files
from bench.end_to_end import PARTITIONS, PROCESSES, THREADS, by_task, raw_metadata
from bench.harness import PY, REPO, Bench, run_json
from bench.orchestration import airflow_env
from bench.sizes import Size
from bench.web import static_server

NEW_SHARE = 1 / 11  # of the images: the new batch is 10% of the base
REPEATED_OF_BASE = 0.05  # rows of the new file repeating a base pair, as a share of the base file's rows


def batch_files(folder: Path, base_url: str, names: list[str]) -> tuple[Path, Path]:
    """(base CSV, new CSV): the base's images with their repeated rows; the new images with
    theirs, plus pairs of the base again under new SAMPLE_IDs (LAION's dumps repeat so)."""
    whole = raw_metadata(folder / "all", base_url, names) / "part-00000.csv"
    # Strings as written: a caption like "NA" must come back as it was.
    rows = pd.read_csv(whole, sep="|", dtype=str, keep_default_na=False)
    base_urls = {f"{base_url}/{n}" for n in names[: round(len(names) * (1 - NEW_SHARE))]}
    in_base = rows["URL"].isin(base_urls)
    base = rows[in_base]
    again = base.drop_duplicates(["URL", "TEXT"]).sample(n=round(REPEATED_OF_BASE * len(base)), random_state=1)
    again = again.assign(SAMPLE_ID=np.arange(len(rows), len(rows) + len(again)).astype(str))
    files = (folder / "base" / "part-00000.csv", folder / "new" / "part-00001.csv")
    for path, frame in zip(files, (base, pd.concat([rows[~in_base], again]))):
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, sep="|", index=False)
    return files


def run(size: Size, work: Path, clip_model: str) -> Bench:
    www = work / "cache" / f"www-{size.images}"
    names = jpeg_files(www, size.images)
    env = airflow_env(work)
    bench = Bench("growth", settings={"images": size.images, "new_share_of_images": round(NEW_SHARE, 4),
                                      "repeated_base_pairs_share": REPEATED_OF_BASE, "dedup_partitions": PARTITIONS,
                                      "processes_count": PROCESSES, "thread_count": THREADS,
                                      "number_sample_per_shard": size.shard_samples, "clip_batch_size": size.embed_batch,
                                      "index": "the DAG's defaults (4G / 8G, autofaiss chooses the key)",
                                      "clip_model": "demo ViT-S-32"})
    bench.notes.append("bench/web.py runs nginx with access_log off: the image requests of a run are the "
                       "report's download attempts (one request per unique pair of the parts it downloads)")
    grown = work / "growth" / "grown"
    roots = {"setup": grown, "grow": grown, "rebuild": work / "growth" / "rebuilt"}
    with static_server(www, work / "nginx-growth") as (base_url, server):
        bench.settings["server"] = server
        base, new = batch_files(work / "growth" / "raw", base_url, names)
        bench.settings["rows"] = {"base": len(pd.read_csv(base, sep="|", dtype=str)),
                                  "new": len(pd.read_csv(new, sep="|", dtype=str))}
        files = {"setup": [base], "grow": [base, new], "rebuild": [base, new]}
        for case, root in roots.items():
            conf = {"metadata_urls": [str(f) for f in files[case]], "output_root": str(root),
                    "dedup_partitions": PARTITIONS, "processes_count": PROCESSES, "thread_count": THREADS,
                    "number_sample_per_shard": size.shard_samples, "clip_model": clip_model,
                    "clip_batch_size": size.embed_batch, "allowed_networks": ["127.0.0.0/8"],
                    "max_requests_per_second_per_host": 0}
            bench.commands[case] = [PY, "-m", "bench.workers", "run-dag", str(REPO / "dags"), "laion_pipeline",
                                    json.dumps(conf)]

        def dag_run(case: str, rep: int, *, fresh: bool) -> dict[str, Any]:
            if fresh:
                shutil.rmtree(roots[case], ignore_errors=True)
            done = run_json(bench.commands[case], env=env, log=work / "logs" / f"growth-{case}-{rep}.log")
            report = json.loads((roots[case] / "report" / "report.json").read_text())
            return {**done, **run_numbers(report, case), **failed_tries(work), "per_task": by_task(done.pop("per_task"))}

        # setup leaves the base dataset that grow adds to: fresh each repetition, not compared.
        cases = {"setup": lambda rep: dag_run("setup", rep, fresh=True),
                 "grow": lambda rep: dag_run("grow", rep, fresh=False),
                 "rebuild": lambda rep: dag_run("rebuild", rep, fresh=True)}
        med = bench.interleave(cases, size.reps)
    same = all(med["grow"][k] == med["rebuild"][k] for k in ("dataset_pairs", "dataset_downloaded", "index_ntotal"))
    bench.notes.append(f'final datasets {"equal" if same else "DIFFER"}: grow {med["grow"]["dataset_pairs"]} pairs, '
                       f'{med["grow"]["dataset_downloaded"]} images, {med["grow"]["index_ntotal"]} vectors; rebuild '
                       f'{med["rebuild"]["dataset_pairs"]}, {med["rebuild"]["dataset_downloaded"]}, {med["rebuild"]["index_ntotal"]}')
    ratio = bench.ratio("grow_over_rebuild", med["grow"]["seconds"], med["rebuild"]["seconds"])
    bench.ratio("grow_downloads_over_rebuild", med["grow"]["downloaded"], med["rebuild"]["downloaded"])
    bench.ratio("grow_vectors_over_rebuild", med["grow"]["vectors_added"], med["rebuild"]["vectors_added"])
    bench.target("growing run / full rebuild (time)", ratio, "<=", 0.2)
    bench.target("index recall@10 after growth", med["grow"]["recall_at_10"], ">=", 0.95)
    return bench


def run_numbers(report: dict[str, Any], case: str) -> dict[str, Any]:
    """What one run did, from its report.json: for grow the latest batch alone, otherwise the whole dataset."""
    batch, image = report["latest_batch"], report["index"]["image"]
    own = ({"downloaded": batch["downloaded"], "download_attempts": batch["download_count"]} if case == "grow"
           else {"downloaded": report["download"]["successes"], "download_attempts": report["download"]["count"]})
    return {
        **own,
        "batch": batch["batch"],
        "batch_rows_in": batch["rows_in"],
        "batch_new_pairs": batch["rows_out"],
        "duplicates_of_earlier_batches": batch["duplicates_of_earlier_batches"],
        "vectors_added": image["added"],
        "index_action": image["action"],
        "index_key": image["index_key"],
        "recall_at_10": image["recall_at_10"],
        "dataset_pairs": report["dedup"]["rows_out"],
        "dataset_downloaded": report["download"]["successes"],
        "index_ntotal": image["ntotal"],
    }


def failed_tries(work: Path) -> dict[str, Any]:
    """The failed tries of the latest laion_pipeline run in the bench's SQLite database: a
    task's duration is its last try's, so time spent in tries that failed shows only here."""
    with closing(sqlite3.connect(work / "airflow" / "airflow.db")) as db:
        rows = db.execute(
            "SELECT task_id, map_index, duration FROM task_instance_history WHERE state = 'failed' AND run_id = "
            "(SELECT run_id FROM dag_run WHERE dag_id = 'laion_pipeline' ORDER BY start_date DESC LIMIT 1)"
        ).fetchall()
    return {"failed_tries": len(rows), "failed_try_seconds": round(sum(d or 0 for _, _, d in rows), 3),
            "failed_tries_of": sorted(f"{task}[{index}]" for task, index, _ in rows)}
