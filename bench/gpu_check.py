"""gpu_check: the clip_embeddings stage on a GPU vs a bare torch loop of the same model.

    PYTHONPATH=. python3 bench/gpu_check.py OUT_JSON [--samples N] [--batch B] [--workers W]

Makes N synthetic samples (JPEGs 150-600 px from sampleweb.images, thumbnailed to 256 px
like bench.data.webdataset_tars; LAION captions from bench.data.captions) in webdataset
tars of 512, untrained ViT-B-32 weights (sampleweb.demo_model), then, interleaved, twice:

* stage: stages.embeddings.compute_embeddings in a fresh process (model load included,
  as in bench/embeddings.py); on CUDA it decodes on the device (stages.device_embed), whose
  stats split the time into reading (waiting on the tar reader), decoding+preprocessing,
  inference and writing, and count the images decoded on the CPU instead;
* bare: the same model through all_clip's loading path on the GPU (its wrapper autocasts
  to bf16/fp16 there, as in the stage), images already preprocessed and captions already
  tokenized; encode_image + encode_text batch by batch, synchronized before each clock read.
  Also timed: the mapper's own per-batch work (host-to-device copy, normalize, fp16 copy
  back) and the model in fp32 without autocast.

Then the stage with clip-retrieval's reader (decode_on="reader": PIL in DataLoader workers),
and one more stage run with 2 preprocessing workers (the stage's default before this
check, which showed decoding to be the bottleneck on a GPU; it now uses every core there). Every case runs
in its own process; a case's output goes to a log beside OUT_JSON.

Where clip_retrieval's top-level package cannot import (its web back end needs flask and
faiss, its logger wandb; none of them on the GPU machine), stand-ins under the work folder
let the embedding path import: the package's ``__init__`` is skipped and wandb is an empty
module. The embedding code itself is clip-retrieval's, unchanged.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)  # run as a script: don't let bench/data.py shadow a top-level "data"

ARCH = "ViT-B-32"
PER_TAR = 512
IMAGE_SIZE = 256  # bench.data.webdataset_tars' thumbnail size
DAG_DEFAULT_WORKERS = 2  # the stage's num_prepro_workers before this check (now every core on a GPU)
CASE_TIMEOUT_S = 150  # at most, per case; less near --deadline-s


# ----------------------------------------------------------------------------- data


def _make_tar(job: tuple[int, int, list[str], str, int]) -> str:
    """One tar in bench.data.webdataset_tars' layout, of generated pictures."""
    t, start, texts, path, seed = job
    from bench.data import write_webdataset_tar

    try:
        from sampleweb.images import make_distinct_jpegs

        jpegs = [j.data for j in make_distinct_jpegs(len(texts), seed)]
    except Exception as error:  # noqa: BLE001 - photographs missing there: random pictures instead
        print(f"make_distinct_jpegs failed ({error!r}); using random pictures", file=sys.stderr)
        jpegs = _random_jpegs(len(texts), seed)
    write_webdataset_tar(Path(path), t, start, jpegs, texts, IMAGE_SIZE)
    return path


def _random_jpegs(n: int, seed: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(150, 601, 2))
        small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
        out.append(buf.getvalue())
    return out


def make_tars(folder: Path, samples: int, per_tar: int, processes: int) -> list[str]:
    import multiprocessing

    from bench.data import captions

    folder.mkdir(parents=True, exist_ok=True)
    texts = captions(samples)["TEXT"].tolist()
    jobs = []
    for t, start in enumerate(range(0, samples, per_tar)):
        path = str(folder / f"{t:05d}.tar")
        if not os.path.exists(path):
            jobs.append((t, start, texts[start : start + per_tar], path, 1000 + t))
    if jobs:
        with multiprocessing.get_context("fork").Pool(min(processes, len(jobs))) as pool:
            pool.map(_make_tar, jobs, chunksize=1)
    return [str(folder / f"{t:05d}.tar") for t in range(len(range(0, samples, per_tar)))]


# ----------------------------------------------------------------------------- stand-ins


def prepare_shims(work: Path, force: bool, stub_sentence_transformers: bool = False) -> tuple[str | None, list[str]]:
    """A folder of stand-in modules for what the GPU machine lacks, or None when nothing is missing."""
    from importlib.util import find_spec

    shim = work / "shim"
    shutil.rmtree(shim, ignore_errors=True)
    made = []
    front_end = ("flask", "flask_restful", "flask_cors", "faiss", "wandb", "h5py", "prometheus_client", "werkzeug")
    if force or any(find_spec(m) is None for m in front_end):
        spec = find_spec("clip_retrieval")  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("clip_retrieval is not installed")
        real = list(spec.submodule_search_locations)[0]
        (shim / "clip_retrieval").mkdir(parents=True)
        (shim / "clip_retrieval" / "__init__.py").write_text(
            '"""Stand-in: clip_retrieval without its __init__ (back end, front end, index: flask, faiss)."""\n'
            f"__path__.append({real!r})\n"
        )
        made.append("clip_retrieval.__init__")
    if force or find_spec("wandb") is None:
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "wandb.py").write_text('"""Stand-in: clip-retrieval imports wandb; this run never logs to it."""\n')
        made.append("wandb")
    probe = subprocess.run([sys.executable, "-c", "from pkg_resources import packaging"], capture_output=True)
    if force or probe.returncode != 0:
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "pkg_resources.py").write_text(
            '"""Stand-in: clip-anytorch reads only pkg_resources.packaging."""\nimport packaging\nimport packaging.version\n'
        )
        made.append("pkg_resources")
    if stub_sentence_transformers:
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "sentence_transformers.py").write_text(
            '"""Stand-in: clip-retrieval uses SentenceTransformer only for mclip, off here."""\n'
            "class SentenceTransformer:\n    def __init__(self, *a, **k):\n        raise RuntimeError('stub')\n"
        )
        made.append("sentence_transformers")
    return (str(shim) if made else None), made


def child_env(shim: str | None) -> dict[str, str]:
    env = dict(os.environ)
    parts = ([shim] if shim else []) + [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


PROBE = (
    "import time; t=time.perf_counter(); import stages.embeddings; "
    "from clip_retrieval.clip_inference.worker import worker; import all_clip, open_clip, webdataset, torch; "
    "print('imports ok in', round(time.perf_counter()-t, 2), 's; cuda', torch.cuda.is_available())"
)


# ----------------------------------------------------------------------------- cases (child processes)


def case_stage(spec: dict[str, Any]) -> dict[str, Any]:
    import stages.embeddings as se
    from stages.layout import RunLayout

    parts: dict[str, float] = {}
    preload = se.preload_clip

    def timed_preload(*args: Any, **kwargs: Any) -> None:  # same call, timed
        started = time.perf_counter()
        preload(*args, **kwargs)
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        parts["preload_seconds"] = round(parts.get("preload_seconds", 0) + time.perf_counter() - started, 4)

    se.preload_clip = timed_preload
    out = spec["out"]
    shutil.rmtree(out, ignore_errors=True)
    layout = RunLayout(out)  # the stage writes layout.embeddings under out
    settings = se.EmbeddingSettings(clip_model=spec["clip_model"], clip_batch_size=spec["batch"],
                                    num_prepro_workers=spec["workers"], decode_on=spec.get("decode_on"))
    started = time.perf_counter()
    numbers = se.compute_embeddings(spec["tars"], layout, settings, samples=spec["samples"])
    seconds = time.perf_counter() - started
    stats: dict[str, float] = {}
    for path in sorted(Path(layout.embeddings, "stats").glob("*.json")):
        for key, value in json.loads(Path(path).read_text()).items():
            if key.endswith("_duration") or key in ("sample_count", "decoded_on_cpu", "undecodable"):
                stats[key] = round(stats.get(key, 0) + value, 4)
    result = {
        "seconds": round(seconds, 4), "count": numbers["count"], "text_count": numbers["text_count"],
        "compute_seconds": numbers["compute_seconds"], "device": numbers["device"],
        "partitions": numbers["partitions"], "workers": spec["workers"], **parts,
        "clip_retrieval_stats": stats,
    }
    result["samples_per_s"] = round(result["count"] / seconds, 2)
    if "preload_seconds" in parts:  # the worker: DataLoader start, decode/preprocess, model, write
        worker_seconds = numbers["compute_seconds"] - parts["preload_seconds"]
        result["worker_seconds"] = round(worker_seconds, 4)
        result["samples_per_s_without_model_load"] = round(result["count"] / worker_seconds, 2)
    shutil.rmtree(out, ignore_errors=True)
    return result


class _Samples:
    """(preprocessed image) per JPEG, for a DataLoader: decoding happens before any clock."""

    def __init__(self, jpegs: list[bytes], preprocess: Any) -> None:
        self.jpegs, self.preprocess = jpegs, preprocess

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        return self.preprocess(Image.open(io.BytesIO(self.jpegs[i])))


def case_bare(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from all_clip.main import load_clip_without_warmup
    from torch.utils.data import DataLoader

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = spec["batch"]
    started = time.perf_counter()
    model, preprocess, tokenizer = load_clip_without_warmup(spec["clip_model"], False, device, None)
    if device == "cuda":
        torch.cuda.synchronize()
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    jpegs, texts = [], []
    for tar in spec["tars"]:
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                data = archive.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    jpegs.append(data)
                elif member.name.endswith(".txt"):
                    texts.append(data.decode())
    loader = DataLoader(_Samples(jpegs, preprocess), batch_size=batch, num_workers=spec["workers"],
                        pin_memory=device == "cuda", multiprocessing_context="fork" if spec["workers"] else None)
    pixels_cpu = list(loader)
    tokens_all = tokenizer(texts)
    tokens_cpu = [tokens_all[i : i + batch] for i in range(0, len(texts), batch)]
    if device == "cuda":
        tokens_cpu = [t.pin_memory() for t in tokens_cpu]
    pixels_dev = [p.to(device) for p in pixels_cpu]
    tokens_dev = [t.to(device) for t in tokens_cpu]
    prep_seconds = time.perf_counter() - started

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def model_only(encode_image: Any, encode_text: Any, first: int | None = None) -> None:
        for p, t in list(zip(pixels_dev, tokens_dev))[:first]:
            encode_image(p)
            encode_text(t)

    def like_mapper(encode_image: Any, encode_text: Any, first: int | None = None) -> None:
        # clip_retrieval.clip_inference.mapper.ClipMapper.__call__, minus the Python dict
        for p, t in list(zip(pixels_cpu, tokens_cpu))[:first]:
            image = encode_image(p.to(device))
            image /= image.norm(dim=-1, keepdim=True)
            image.cpu().to(torch.float16).numpy()
            text = encode_text(t.to(device))
            text /= text.norm(dim=-1, keepdim=True)
            text.cpu().to(torch.float16).numpy()

    variants = {"bare": (model_only, model.encode_image, model.encode_text),
                "bare_like_mapper": (like_mapper, model.encode_image, model.encode_text)}
    if device == "cuda":  # all_clip's wrapper autocasts on cuda; the inner model alone runs fp32 (tf32 matmuls)
        inner = model.inner_model
        variants["bare_fp32"] = (model_only, inner.encode_image, inner.encode_text)
    result: dict[str, Any] = {"count": len(jpegs), "device": device, "load_seconds": round(load_seconds, 4),
                              "prep_seconds": round(prep_seconds, 4), "batches": len(pixels_cpu),
                              "autocast_dtype": str(getattr(model, "dtype", None))}
    with torch.no_grad():
        for name, (loop, encode_image, encode_text) in variants.items():
            loop(encode_image, encode_text, first=2)  # first calls (allocations, kernel choice), not timed
            sync()
            started = time.perf_counter()
            loop(encode_image, encode_text)
            sync()
            seconds = time.perf_counter() - started
            result[name] = {"seconds": round(seconds, 4), "samples_per_s": round(len(jpegs) / seconds, 2)}
    result["seconds"] = result["bare"]["seconds"]
    result["samples_per_s"] = result["bare"]["samples_per_s"]
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


# ----------------------------------------------------------------------------- parent


def run_case(case: str, spec: dict[str, Any], work: Path, env: dict[str, str], log: Path, tag: str,
             timeout: float = CASE_TIMEOUT_S) -> dict[str, Any]:
    if timeout < 20:
        print(f"[gpu_check] {tag} skipped: past --deadline-s", file=sys.stderr, flush=True)
        return {"error": "skipped: past --deadline-s"}
    spec_path = work / f"spec-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "--case", case, str(spec_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the case and its DataLoader workers
        output, _ = proc.communicate()
        output += f"\n[gpu_check] killed after {timeout:.0f} s\n"
    wall = time.perf_counter() - started
    with log.open("a") as f:
        f.write(f"\n===== {tag} ({case}) rc={proc.returncode} wall={wall:.1f}s\n{output}")
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(output.splitlines()[-25:])
        print(f"[gpu_check] {tag} failed (rc={proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        return {"error": f"rc={proc.returncode}", "wall_seconds": round(wall, 2), "tail": tail[-3000:]}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_seconds"] = round(wall, 2)
    print(f"[gpu_check] {tag}: {json.dumps(result)}", flush=True)
    return result


def median_of(reps: list[dict[str, Any]], case: str, key: str) -> float | None:
    values = [r[case][key] for r in reps if key in r.get(case, {})]
    return round(statistics.median(values), 4) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_json")
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--per-tar", type=int, default=PER_TAR)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--work", default="/tmp/gpu_check")
    parser.add_argument("--no-default-workers-run", action="store_true")
    parser.add_argument("--force-shims", action="store_true", help="use the stand-ins even where not needed (tests)")
    parser.add_argument("--budget-s", type=float, default=360, help="skip the optional runs past this many seconds")
    parser.add_argument("--deadline-s", type=float, default=480, help="no case runs on past this many seconds")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    log = out_json.with_suffix(".log")
    log.write_text("")
    record: dict[str, Any] = {
        "what": "clip_embeddings stage (stages.embeddings.compute_embeddings, fresh process, model load included) "
                "vs bare loop of the same model (all_clip loading path, tensors preprocessed, captions tokenized)",
        "samples": args.samples, "batch_size": args.batch, "num_prepro_workers": args.workers,
        "samples_per_tar": args.per_tar, "clip_model": f"open_clip:{ARCH} (untrained demo weights)",
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.node(),
    }

    def left() -> float:
        return min(CASE_TIMEOUT_S, args.deadline_s - (time.perf_counter() - t0))

    def save() -> None:
        record["total_seconds"] = round(time.perf_counter() - t0, 1)
        out_json.write_text(json.dumps(record, indent=1))

    started = time.perf_counter()
    tars = make_tars(work / f"tars-{args.samples}-{args.per_tar}", args.samples, args.per_tar, os.cpu_count() or 1)
    record["tars"] = len(tars)
    record["data_seconds"] = round(time.perf_counter() - started, 2)
    print(f"[gpu_check] {len(tars)} tars in {record['data_seconds']} s", flush=True)

    started = time.perf_counter()
    from sampleweb.demo_model import ensure_demo_weights

    clip_model = ensure_demo_weights(work / "models" / f"demo-{ARCH.lower()}.pt", arch=ARCH)
    record["weights_seconds"] = round(time.perf_counter() - started, 2)

    shim, shims = prepare_shims(work, args.force_shims)
    env = child_env(shim)
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True)
    if probe.returncode != 0 and "sentence_transformers" in probe.stderr:
        shim, shims = prepare_shims(work, args.force_shims, stub_sentence_transformers=True)
        env = child_env(shim)
        probe = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True)
    record["shims"] = shims
    print(f"[gpu_check] stand-ins: {shims or 'none'}; {probe.stdout.strip()}", flush=True)
    if probe.returncode != 0:
        record["error"] = "imports failed: " + probe.stderr[-3000:]
        save()
        print(probe.stderr[-3000:], file=sys.stderr)
        return 1

    spec = {"tars": tars, "clip_model": clip_model, "samples": args.samples, "batch": args.batch,
            "workers": args.workers, "out": str(work / "embeddings")}
    reps: list[dict[str, Any]] = []
    record["repetitions"] = reps
    for rep in range(args.reps):
        reps.append({"rep": rep})
        reps[-1]["stage"] = run_case("stage", spec, work, env, log, f"stage-{rep}", left())
        save()
        reps[-1]["bare"] = run_case("bare", spec, work, env, log, f"bare-{rep}", left())
        save()

    med = {
        "stage_samples_per_s": median_of(reps, "stage", "samples_per_s"),
        "stage_seconds": median_of(reps, "stage", "seconds"),
        "stage_compute_seconds": median_of(reps, "stage", "compute_seconds"),
        "stage_preload_seconds": median_of(reps, "stage", "preload_seconds"),
        "stage_worker_seconds": median_of(reps, "stage", "worker_seconds"),
        "stage_samples_per_s_without_model_load": median_of(reps, "stage", "samples_per_s_without_model_load"),
        "bare_samples_per_s": median_of(reps, "bare", "samples_per_s"),
        "bare_seconds": median_of(reps, "bare", "seconds"),
    }
    for variant in ("bare_like_mapper", "bare_fp32"):
        values = [r["bare"][variant]["samples_per_s"] for r in reps if variant in r.get("bare", {})]
        med[f"{variant}_samples_per_s"] = round(statistics.median(values), 2) if values else None
    record["median"] = med
    if med["stage_samples_per_s"] and med["bare_samples_per_s"]:
        record["ratio_stage_over_bare"] = round(med["stage_samples_per_s"] / med["bare_samples_per_s"], 4)
        if med["bare_like_mapper_samples_per_s"]:
            record["ratio_stage_over_bare_like_mapper"] = round(
                med["stage_samples_per_s"] / med["bare_like_mapper_samples_per_s"], 4)
    save()

    # The same stage with clip-retrieval's reader (PIL in DataLoader workers, the CPU path),
    # against the device decoder that the stage uses on CUDA.
    if time.perf_counter() - t0 < args.budget_s:
        record["stage_with_reader"] = run_case("stage", {**spec, "decode_on": "reader"}, work, env, log, "stage-reader", left())
    else:
        record["stage_with_reader"] = "skipped: over --budget-s"
    save()

    if not args.no_default_workers_run and args.workers != DAG_DEFAULT_WORKERS:
        if time.perf_counter() - t0 < args.budget_s:
            extra = run_case("stage", {**spec, "workers": DAG_DEFAULT_WORKERS}, work, env, log,
                             "stage-dag-default-workers", left())
            record["stage_with_dag_default_workers"] = extra
        else:
            record["stage_with_dag_default_workers"] = "skipped: over --budget-s"

    try:
        import torch

        record["torch"] = torch.__version__
        record["cuda"] = torch.version.cuda
        record["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as error:  # noqa: BLE001
        record["torch"] = f"unavailable: {error!r}"
    save()
    print(json.dumps(record), flush=True)
    return 0


def child(case: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = {"stage": case_stage, "bare": case_bare}[case](spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        sys.exit(child(sys.argv[2], sys.argv[3]))
    sys.exit(main())
