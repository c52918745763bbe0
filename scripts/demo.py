"""`make demo`: build a sample web, serve it on 127.0.0.1, run laion_pipeline over it.

Everything lands under data/demo/: the sample web (web/), the run's artifacts (output/),
the demo's CLIP weights (models/) and the run's full log (logs/). Prints a line per stage,
then the report's numbers, its path and one search.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "plugins")]  # run_dag, progress; the search plugin

from progress import Console, new_log_file, run_logged  # noqa: E402
from run_dag import migrate_db, run_watched  # noqa: E402

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
        # One local server is every host: no pace per host (the default is polite to real hosts).
        "max_requests_per_second_per_host": 0,
        "max_index_memory_usage": "1G",
        "current_memory_available": "2G",
    }


def print_summary(output: Path, clip_model: str, out: TextIO | None = None) -> None:
    from laion_search.encoder import ClipEncoder
    from laion_search.reader import RunIndex
    from stages.layout import RunLayout

    out = out or sys.stdout
    layout = RunLayout(str(output))
    report = json.loads(Path(layout.report_json).read_text())
    d = report["download"]
    lines = [
        "stages (s): " + ", ".join(f"{s['name']} {s['duration_s']:.1f}" for s in report["stages"]),
        "funnel: " + ", ".join(f"{f['step']} {f['count']}" for f in report["funnel"]),
        f"download: {d['successes']} ok, {d['failed_to_download']} failed to download, {d['failed_to_resize']} failed to resize",
        *(f"{name} index: {i['index_key']}, {i['ntotal']} vectors, recall@10 {i['recall_at_10']}" for name, i in report["index"].items()),
        f"report: {layout.report_html}",
    ]
    query = "a photo of a cat"
    hits = RunIndex(str(output)).search_vector(ClipEncoder(clip_model).encode_text(query), k=3)
    lines.append(f"search {query!r} (the demo weights are untrained: the ranking carries no meaning):")
    lines += [f"  {hit.score:+.3f}  {hit.key}  {hit.caption[:70]}" for hit in hits]
    out.write("".join(line + "\n" for line in lines))
    out.flush()


def run_demo(console: Console) -> bool:
    migrate_db()
    clip_model = ensure_demo_weights(DEMO / "models" / "demo-vit-s-32.pt")
    web, output = DEMO / "web", DEMO / "output"
    shutil.rmtree(output, ignore_errors=True)
    (web / "www").mkdir(parents=True, exist_ok=True)
    with SampleWebServer(web / "www") as server:
        expected = build_sample_web(web, server.url)
        console.line(f"sample web on {server.url}: {expected['rows_out']} unique rows, {expected['successes']} good images")
        if not run_watched(demo_conf(web, output, clip_model), console, every=5):
            return False
    print_summary(output, clip_model, console.stream)
    return True


def main() -> int:
    return run_logged("demo", new_log_file(DEMO / "logs"), run_demo)


if __name__ == "__main__":
    sys.exit(main())
