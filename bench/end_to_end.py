"""end to end: the whole DAG (dag.test, as `make run`) vs bench/hand_run.sh, the same tools by hand.

Both read the same raw CSV (URLs of JPEGs served by nginx on 127.0.0.1) with the same
settings. The DAG run also yields the orchestration overhead: its wall time minus the time
its tasks ran, and minus the time the stages themselves report. Then the DAG runs again
with the same conf over the same output (`make run` twice): every stage finds its work done,
so what is left is task start-up and the checks that skip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.data import captions, jpeg_files
from bench.harness import PY, REPO, Bench, run_json, run_timed
from bench.orchestration import airflow_env
from bench.sizes import Size
from bench.web import static_server

PARTITIONS, PROCESSES, THREADS = 2, 2, 32


def raw_metadata(folder: Path, base_url: str, names: list[str]) -> Path:
    """One raw CSV in LAION's shape: every image once, 5% of rows repeated."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame({"SAMPLE_ID": np.arange(len(names)), "URL": [f"{base_url}/{n}" for n in names],
                         "TEXT": captions(len(names))["TEXT"], "HEIGHT": 256, "WIDTH": 256, "LICENSE": "?",
                         "NSFW": "UNLIKELY", "similarity": 0.31})
    rows = pd.concat([rows, rows.sample(frac=0.05, random_state=0)])
    rows.to_csv(folder / "part-00000.csv", sep="|", index=False)
    return folder


def by_task(tasks: list[dict[str, Any]]) -> dict[str, float]:
    """``task[map_index]`` -> its duration, from a bench worker's ``per_task``."""
    return {f'{t["task"]}[{t["map_index"]}]': t["duration"] for t in tasks}


def run(size: Size, work: Path, clip_model: str) -> Bench:
    www = work / "cache" / f"www-{size.images}"
    names = jpeg_files(www, max(size.images, size.e2e_images))[: size.e2e_images]
    env = airflow_env(work)
    bench = Bench("end_to_end", settings={"images": size.e2e_images, "dedup_partitions": PARTITIONS,
                                          "processes_count": PROCESSES, "thread_count": THREADS,
                                          "number_sample_per_shard": size.shard_samples, "clip_batch_size": size.embed_batch,
                                          "max_index_memory_usage": "4G", "clip_model": "demo ViT-S-32"})
    with static_server(www, work / "nginx-e2e") as (base_url, server):
        bench.settings["server"] = server
        raw = raw_metadata(work / "e2e" / "raw", base_url, names)
        outs = {"dag": work / "e2e" / "dag", "script": work / "e2e" / "script"}
        conf = {"metadata_urls": [f"{raw}/*"], "output_root": str(outs["dag"]), "dedup_partitions": PARTITIONS,
                "processes_count": PROCESSES, "thread_count": THREADS, "number_sample_per_shard": size.shard_samples,
                "clip_model": clip_model, "clip_batch_size": size.embed_batch, "allowed_networks": ["127.0.0.0/8"],
                "max_requests_per_second_per_host": 0}
        bench.commands = {
            "dag": [PY, "-m", "bench.workers", "run-dag", str(REPO / "dags"), "laion_pipeline", json.dumps(conf)],
            "script": [str(REPO / "bench" / "hand_run.sh"), str(raw), str(outs["script"]), str(PARTITIONS),
                       str(PROCESSES), str(THREADS), str(size.shard_samples), clip_model, str(size.embed_batch)],
        }

        def dag(rep: int) -> dict[str, Any]:
            shutil.rmtree(outs["dag"], ignore_errors=True)
            done = run_json(bench.commands["dag"], env=env, log=work / "logs" / f"e2e-dag-{rep}.log")
            report = json.loads((outs["dag"] / "report" / "report.json").read_text())
            return {**done, "successes": report["download"]["successes"], "per_task": by_task(done.pop("per_task"))}

        def dag_rerun(rep: int) -> dict[str, Any]:  # over what dag() of this repetition left
            done = run_json(bench.commands["dag"], env=env, log=work / "logs" / f"e2e-dag-rerun-{rep}.log")
            return {**done, "per_task": by_task(done.pop("per_task"))}

        def script(rep: int) -> dict[str, Any]:
            shutil.rmtree(outs["script"], ignore_errors=True)
            done = run_timed(bench.commands["script"], env=env, log=work / "logs" / f"e2e-script-{rep}.log")
            return {"seconds": done["seconds"]}

        # A DAG run is minutes here: one repetition below large.
        cases = {"dag": dag, "dag_rerun": dag_rerun, "script": script}
        med = bench.interleave(cases, size.reps if size.e2e_images >= 1000 else 1)
    ratio = bench.ratio("dag_over_script", med["dag"]["seconds"], med["script"]["seconds"])
    bench.ratio("outside_tasks_share", med["dag"]["outside_tasks_seconds"], med["dag"]["seconds"])
    bench.target("whole DAG / hand-run script", ratio, "<=", 1.10)
    rerun = bench.ratio("rerun_over_first_run", med["dag_rerun"]["seconds"], med["dag"]["seconds"])
    bench.target("DAG rerun with nothing left to do / first run", rerun, "<=", 0.5)
    return bench
