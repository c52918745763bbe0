"""
# laion_pipeline

Raw image-text metadata in, a training-ready webdataset and a searchable CLIP index out:
the LAION-400M preprocessing as one DAG.

| stage | tool | output |
|---|---|---|
| fetch_metadata | fsspec | `raw/` (and the output root's lock) |
| dedup | Spark (`spark_default`) | new `dedup/part-*.parquet` for the raw files no batch holds, `dedup/_stats.json` |
| download_images (one per part not yet done) | img2dataset | `images/<part>/00000.tar` ... |
| clip_embeddings (one per part, after its download; pool `gpu`) | clip-retrieval | `embeddings/{img_emb,text_emb,metadata}/*_<part>_<k>.*` |
| curate (pool `gpu`) | numpy, faiss k-means | `curation/decisions/`, `curated/{img_emb,text_emb,metadata}/`: the kept samples |
| build_index (pool `gpu`) | autofaiss | `index/{image,text}.index` over the kept samples |
| export_subset (with `export_subset`) | tarfile | `subset/<shard>.tar`: the kept (or `subset_keys`) samples as webdataset |
| report (every run past dedup) | | `report/report.json`, `report/report.html` |

A dataset grows: a run over an output root that already holds a dataset deduplicates only
the raw files no earlier run read (against every earlier pair), and downloads, embeds and
indexes only what they add. One run at a time writes an output root.

Every setting is a param of the run; deployment defaults come from `LAION_*` environment
variables (see the README). A stage whose input no retry can fix (a bad setting, a
malformed raw file, nothing downloaded) fails at once, without retries. The report task
runs whatever happened upstream: for every run past dedup it writes the report, which
says which stage stopped and why; then it fails too when the run did not finish.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from airflow.sdk import Asset, Param, TriggerRule, dag, task_group

from operators.curate import CurateOperator
from operators.dedup import DedupOperator
from operators.download import DownloadImagesOperator, ListPartsOperator
from operators.embeddings import ClipEmbeddingsOperator
from operators.export import ExportSubsetOperator
from operators.fetch import FetchMetadataOperator
from operators.index import BuildIndexOperator
from operators.params import (
    CONN, DAG_ARGUMENTS, DOWNLOAD_POOL, GPU_POOL, GPU_QUEUE, ROOT, params_of, storage_params, templates_of,
)  # fmt: skip
from operators.report import ReportOperator
from stages.curate.blocklists import BlocklistSettings
from stages.curate.export import ExportSettings
from stages.curate.stage import CurationSettings
from stages.dedup.settings import DedupSettings
from stages.embeddings import EmbeddingSettings
from stages.images.download import DownloadSettings
from stages.index import INDEX_ASSET
from stages.index.build import IndexSettings

# None: runs only when triggered. A cron or preset ("@daily") runs it per date partition,
# for the dates from LAION_START_DATE to LAION_END_DATE (ISO dates; both optional).
SCHEDULE = os.environ.get("LAION_SCHEDULE") or None
if SCHEDULE and not os.environ.get("LAION_METADATA_URLS"):
    raise ValueError(
        f"LAION_SCHEDULE is {SCHEDULE!r} but LAION_METADATA_URLS is not set: scheduled runs take their "
        "metadata_urls from it, e.g. 's3://laion-meta/{{ ds }}/*.parquet'"
    )
START_DATE, END_DATE = (
    datetime.fromisoformat(d).replace(tzinfo=timezone.utc) if d else None
    for d in (os.environ.get("LAION_START_DATE"), os.environ.get("LAION_END_DATE"))
)

PARAMS = {
    "metadata_urls": Param(
        [u for u in os.environ.get("LAION_METADATA_URLS", "").split(",") if u],
        type="array", items={"type": "string", "minLength": 1}, minItems=1,
        description="Raw metadata sources: http(s)://, s3://, file:// URLs, local paths or globs; may hold {{ ds }}.",
    ),
    **storage_params(),
    **params_of(DedupSettings),
    **params_of(DownloadSettings),
    **params_of(EmbeddingSettings),
    **params_of(CurationSettings),
    "export_subset": Param(
        False, type="boolean",
        description="Also write the curated subset (or the subset_keys samples) as webdataset under subset/.",
    ),  # fmt: skip
    **params_of(ExportSettings),
    **params_of(IndexSettings),
}


@dag(
    dag_id="laion_pipeline",
    schedule=SCHEDULE,
    start_date=START_DATE,
    end_date=END_DATE,
    catchup=False,
    params=PARAMS,
    doc_md=__doc__,
    tags=["laion", "images", "clip"],
    **DAG_ARGUMENTS,
)
def laion_pipeline() -> None:
    stage = {"output_root": ROOT, "storage_conn_id": CONN}
    gpu = {"pool": GPU_POOL, "queue": GPU_QUEUE}

    fetch = FetchMetadataOperator(
        task_id="fetch_metadata",
        metadata_urls="{{ params.metadata_urls | with_run_date }}",
        # Settings that would fail a later stage (a blocklist, a classifier) are checked first.
        checks={**templates_of(CurationSettings), **templates_of(BlocklistSettings)},
        **stage,
    )
    dedup = DedupOperator(task_id="dedup", settings=templates_of(DedupSettings), conn_id="spark_default", **stage)
    parts = ListPartsOperator(task_id="list_dedup_parts", clip_model="{{ params.clip_model }}", **stage)

    # One download and one embedding task per part: part i's embeddings start when part i's
    # download ends, while other parts still download, and as many embed at once as the
    # gpu pool has slots. The task ids stay download_images and clip_embeddings.
    @task_group(group_id="per_part", prefix_group_id=False)
    def per_part(part: str) -> None:
        download = DownloadImagesOperator(
            task_id="download_images",
            pool=DOWNLOAD_POOL,
            map_index_template="{{ task.part }}",
            settings=templates_of(DownloadSettings),
            part=part,
            **stage,
        )
        embeddings = ClipEmbeddingsOperator(
            task_id="clip_embeddings",
            map_index_template="{{ task.part }}",
            settings=templates_of(EmbeddingSettings),
            part=part,
            **gpu,
            **stage,
        )
        download >> embeddings

    each_part = per_part.expand(part=parts.output)
    # none_failed: with no part left to download or embed (a batch of nothing new), the
    # mapped tasks are skipped and curation and the index still run (finding nothing new, they skip).
    curate = CurateOperator(
        task_id="curate", settings=templates_of(CurationSettings), trigger_rule=TriggerRule.NONE_FAILED, **gpu, **stage
    )
    index = BuildIndexOperator(
        task_id="build_index",
        outlets=[Asset(INDEX_ASSET)],  # the search plugin reloads a run's index on its events
        settings=templates_of(IndexSettings),
        **gpu,
        **stage,
    )
    export = ExportSubsetOperator(
        task_id="export_subset", enabled="{{ params.export_subset }}", settings=templates_of(ExportSettings), **stage
    )
    # Runs whatever happened upstream, so a run that failed after dedup has its report too.
    report = ReportOperator(task_id="report", trigger_rule=TriggerRule.ALL_DONE, **stage)

    fetch >> dedup >> parts >> each_part >> curate >> index >> report
    curate >> export >> report
    each_part >> report  # a failed part stops build_index at once; the report waits for every part


laion_pipeline()
