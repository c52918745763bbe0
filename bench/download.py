"""download: our stage (as the DAG runs it) vs the bare img2dataset command vs the decode/resize limit."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from pathlib import Path
from typing import Any

from bench.data import jpeg_files, url_parquet
from bench.harness import PY, Bench, env_for_tools, run_json, run_timed
from bench.sizes import Size
from bench.web import static_server

IMAGE_SIZE, RESIZE_MODE, ENCODE_QUALITY, THREADS = 256, "border", 95, 32
ADDITIONAL_COLUMNS = ["SAMPLE_ID", "NSFW", "similarity", "LICENSE"]  # as stages.images.download saves


def bare_command(parquet: Path, out: Path, processes: int, shard_samples: int) -> list[str]:
    """The img2dataset command a user would type for the same part and settings."""
    img2dataset = str(Path(PY).with_name("img2dataset"))
    return [
        img2dataset, f"--url_list={parquet}", "--input_format=parquet", "--url_col=URL", "--caption_col=TEXT",
        f"--save_additional_columns={json.dumps(ADDITIONAL_COLUMNS)}", "--output_format=webdataset",
        f"--output_folder={out}", f"--image_size={IMAGE_SIZE}", f"--resize_mode={RESIZE_MODE}",
        f"--processes_count={processes}", f"--thread_count={THREADS}", f"--number_sample_per_shard={shard_samples}",
        "--timeout=10", f"--encode_quality={ENCODE_QUALITY}", "--enable_wandb=False", "--distributor=multiprocessing",
        "--oom_shard_count=10",
    ]


def stage_command(parquet: Path, out: Path, processes: int, shard_samples: int, start_method: str | None = None) -> list[str]:
    """The stage with the DAG's defaults; ``start_method`` overrides how its workers start."""
    settings = {"image_size": IMAGE_SIZE, "resize_mode": RESIZE_MODE, "processes_count": processes,
                "thread_count": THREADS, "number_sample_per_shard": shard_samples, "timeout": 10,
                "encode_quality": ENCODE_QUALITY}
    if start_method:
        settings["start_method"] = start_method
    return [PY, "-m", "bench.workers", "download-stage", str(parquet), str(out), json.dumps(settings)]


def shard_stats(out: Path) -> dict[str, Any]:
    """Successes, and img2dataset's own timing: the slowest shard, and the span from the
    first shard's start to the last one's end (the run without its start-up)."""
    stats = [json.loads(p.read_text()) for p in out.rglob("*_stats.json")]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats) if stats else 0
    return {"successes": sum(s["successes"] for s in stats), "count": sum(s["count"] for s in stats),
            "img2dataset_shard_seconds": round(max((s.get("duration") or 0) for s in stats), 3) if stats else 0,
            "shards_span_seconds": round(span, 3)}


# --- the compute limit: the same bytes decoded, resized (border mode) and re-encoded, no network ---


def _resize_border(data: bytes) -> int:
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    h, w = img.shape[:2]
    scale = IMAGE_SIZE / max(h, w)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LANCZOS4
    img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interpolation)
    h, w = img.shape[:2]
    top, left = (IMAGE_SIZE - h) // 2, (IMAGE_SIZE - w) // 2
    img = cv2.copyMakeBorder(img, top, IMAGE_SIZE - h - top, left, IMAGE_SIZE - w - left, cv2.BORDER_CONSTANT,
                             value=[255, 255, 255])
    return len(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, ENCODE_QUALITY])[1])


def _resize_files(paths: list[str]) -> int:
    import cv2

    cv2.setNumThreads(1)  # as img2dataset: one image per thread, parallel across processes
    return sum(1 for p in paths if _resize_border(Path(p).read_bytes()))


def compute_limit(paths: list[str], processes: int) -> dict[str, Any]:
    """Images per second through decode + resize + encode in ``processes`` warm worker processes."""
    chunks = [paths[i::processes] for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_resize_files, [c[:2] for c in chunks])  # start-up and imports, not timed
        for p in paths:  # the bytes come from the page cache for every case alike
            Path(p).read_bytes()
        started = time.perf_counter()
        done = sum(pool.map(_resize_files, chunks))
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 4), "successes": done}


def run(size: Size, work: Path, processes: int) -> Bench:
    bench = Bench("download")
    www = work / "cache" / f"www-{size.images}"
    names = jpeg_files(www, size.images)
    with static_server(www, work / "nginx") as (base_url, server):
        parquet = url_parquet(work / "download" / "dedup" / "part-00000.parquet", base_url, names)
        outs = {name: work / "download" / name for name in ("stage", "bare", "stage_spawn")}
        bench.settings = {"images": size.images, "processes": processes, "thread_count": THREADS,
                          "number_sample_per_shard": size.shard_samples, "image_size": IMAGE_SIZE,
                          "resize_mode": RESIZE_MODE, "server": server, "stage_settings": "DownloadSettings, DAG defaults"}
        bench.commands = {"stage": stage_command(parquet, outs["stage"], processes, size.shard_samples),
                          "bare": bare_command(parquet, outs["bare"], processes, size.shard_samples),
                          # the stage before its workers were forked: img2dataset's own spawned pool
                          "stage_spawn": stage_command(parquet, outs["stage_spawn"], processes, size.shard_samples, "spawn"),
                          "limit": f"bench.download.compute_limit over the same {size.images} files, {processes} processes"}

        def case(name: str):
            def go(rep: int) -> dict[str, Any]:
                shutil.rmtree(outs[name], ignore_errors=True)
                if name.startswith("stage"):
                    done = run_json(bench.commands[name], env=env_for_tools())
                else:
                    done = run_timed(bench.commands[name], env=env_for_tools())
                    done.pop("stdout")
                    done["wall_seconds"] = done.pop("seconds")
                stats = shard_stats(outs[name])
                if stats["successes"] < size.images:
                    raise RuntimeError(f"download {name}: {stats['successes']} of {size.images} images ({outs[name]})")
                per_second = stats["successes"] / done["wall_seconds"]
                return {**done, **stats, "samples_per_s": round(per_second, 2),
                        "samples_per_s_per_core": round(per_second / processes, 2)}
            return go

        def limit(rep: int) -> dict[str, Any]:
            done = compute_limit([str(www / n) for n in names], processes)
            per_second = done["successes"] / done["seconds"]
            return {**done, "samples_per_s": round(per_second, 2), "samples_per_s_per_core": round(per_second / processes, 2)}

        med = bench.interleave({"stage": case("stage"), "bare": case("bare"), "limit": limit,
                                "stage_spawn": case("stage_spawn")}, size.reps)
    stage, bare, lim = (med[k]["samples_per_s"] for k in ("stage", "bare", "limit"))
    bench.target("stage / bare img2dataset (wall)", bench.ratio("stage_over_bare", stage, bare), ">=", 0.95)
    bench.target("stage / decode-resize limit", bench.ratio("stage_over_limit", stage, lim), ">=", 0.6)
    bench.ratio("bare_over_limit", bare, lim)
    bench.ratio("stage_spawn_over_limit", med["stage_spawn"]["samples_per_s"], lim)
    # the steady state: samples over the span of the shards (first start to last end), start-up left out
    bench.ratio("stage_shards_span_over_limit", med["stage"]["successes"] / med["stage"]["shards_span_seconds"], lim)
    bench.ratio("bare_shards_span_over_limit", med["bare"]["successes"] / med["bare"]["shards_span_seconds"], lim)
    return bench
