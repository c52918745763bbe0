"""`make demo`: build a sample web, serve it on 127.0.0.1, run laion_pipeline over it.

Everything lands under data/demo/: the sample web (web/), the run's artifacts (output/)
and the demo's CLIP weights (models/). Prints the stages, the report's path and one search.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from run_dag import run_pipeline  # noqa: E402

from sampleweb.build import build_sample_web  # noqa: E402
from sampleweb.demo_model import ensure_demo_weights  # noqa: E402
from sampleweb.serve import SampleWebServer  # noqa: E402

DEMO = REPO / "data" / "demo"


def demo_conf(web: Path, output: Path, clip_model: str) -> dict:
    """The run settings for a sample web: small shards so the report shows several."""
    return {
        "metadata_urls": [str(web / "raw" / "*")],
        "output_root": str(output),
        "dedup_partitions": 2,
        "processes_count": 2,
        "thread_count": 16,
        "number_sample_per_shard": 50,
        "clip_model": clip_model,
        "clip_batch_size": 64,
        # The sample web is on loopback, which downloads refuse unless opened on purpose.
        "allowed_networks": ["127.0.0.0/8"],
        "max_index_memory_usage": "1G",
        "current_memory_available": "2G",
    }


def print_summary(output: Path, clip_model: str) -> None:
    from stages.search import RunIndex, TextEncoder

    report = json.loads((output / "report" / "report.json").read_text())
    print("\nstage                duration_s")
    for stage in report["stages"]:
        print(f"{stage['name']:<20} {stage['duration_s']:>10.1f}")
    print("\nfunnel:", ", ".join(f"{f['step']} {f['count']}" for f in report["funnel"]))
    d = report["download"]
    print(f"download: {d['successes']} ok, {d['failed_to_download']} failed to download, {d['failed_to_resize']} failed to resize")
    for name, index in report["index"].items():
        print(f"{name} index: {index['index_key']}, {index['ntotal']} vectors, recall@10 {index['recall_at_10']}")
    print(f"\nreport: {output / 'report' / 'report.html'}")
    query = "a photo of a cat"
    hits = RunIndex(str(output)).search_vector(TextEncoder(clip_model).encode(query), k=5)
    print(f"\nsearch {query!r} (demo weights are untrained: the ranking carries no meaning):")
    for hit in hits:
        print(f"  {hit.score:+.3f}  {hit.key}  {hit.caption[:70]}")


def main() -> int:
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL)
    clip_model = ensure_demo_weights(DEMO / "models" / "demo-vit-s-32.pt")
    web, output = DEMO / "web", DEMO / "output"
    shutil.rmtree(output, ignore_errors=True)
    (web / "www").mkdir(parents=True, exist_ok=True)
    with SampleWebServer(web / "www") as server:
        expected = build_sample_web(web, server.url)
        print(f"sample web on {server.url}: {expected['rows_out']} unique rows, {expected['successes']} good images")
        dag_run = run_pipeline(demo_conf(web, output, clip_model))
    if not str(dag_run.state).endswith("success"):
        print(f"demo run {dag_run.run_id} ended {dag_run.state}", file=sys.stderr)
        return 1
    print_summary(output, clip_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
