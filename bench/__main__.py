"""`make bench SIZE=small|medium|large`: every stage against the bare tool and the compute limit.

    python -m bench --size small [--only download,dedup] [--results bench/results] [--work data/bench]
    python -m bench --size medium --only index --index-vectors 1000000 --index-pq-key OPQ32_128,IVF4096,PQ32x8

Writes ``<results>/<date>-<size>.json`` (machine, commands, every repetition, medians,
ratios, targets) and prints the table that docs/benchmarks.md shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from bench.harness import REPO, machine, results_path, write_results
from bench.sizes import SIZES, Size
from bench.table import markdown_table

BENCHES = ("download", "dedup", "embeddings", "index", "orchestration", "end_to_end", "growth")
log = logging.getLogger("bench")


def run_one(name: str, size: Size, work: Path, clip_model: str) -> dict:
    processes = os.cpu_count() or 1  # the DAG's default processes_count
    if name == "download":
        from bench import download
        return download.run(size, work, processes).as_dict()
    if name == "dedup":
        from bench import dedup
        return dedup.run(size, work).as_dict()
    if name == "embeddings":
        from bench import embeddings
        return embeddings.run(size, work, clip_model).as_dict()
    if name == "index":
        from bench import index
        return index.run(size, work).as_dict()
    from bench import orchestration
    orchestration.ensure_home(work)
    if name == "orchestration":
        return orchestration.run(size, work).as_dict()
    if name == "end_to_end":
        from bench import end_to_end
        return end_to_end.run(size, work, clip_model).as_dict()
    from bench import growth
    return growth.run(size, work, clip_model).as_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=None, help="scratch and cached inputs (default data/bench/<size>)")
    parser.add_argument("--index-vectors", type=int, nargs="+", help="index: these vector counts instead of the size's")
    parser.add_argument("--index-pq-key", help="index: this compressed key instead of the size's index_pq_key")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    if args.index_vectors:
        size = dataclasses.replace(size, index_vectors=tuple(args.index_vectors))
    if args.index_pq_key:
        size = dataclasses.replace(size, index_pq_key=args.index_pq_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    work = (args.work or REPO / "data" / "bench" / args.size).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from sampleweb.demo_model import ensure_demo_weights

    clip_model = ensure_demo_weights(work / "models" / "demo-vit-s-32.pt")
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    record = {"size": args.size, "settings": dataclasses.asdict(size), "machine": machine(),
              "command": f"make bench SIZE={args.size}" if chosen == list(BENCHES) and size == SIZES[args.size] else command,
              "benchmarks": {}}
    started = time.time()
    path = results_path(args.results, args.size)
    write_results(path, record)  # claims the name at once: parallel runs of one size do not collide
    for name in chosen:
        log.info("benchmark %s at size %s", name, args.size)
        begun = time.time()
        result = run_one(name, size, work, clip_model)
        result["seconds"] = round(time.time() - begun, 1)
        result["loadavg_end"] = os.getloadavg()
        record["benchmarks"][name] = result
        record["machine"]["loadavg_end"] = os.getloadavg()
        record["seconds"] = round(time.time() - started, 1)
        write_results(path, record)
    print(markdown_table(record))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
