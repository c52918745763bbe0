"""
# laion_pipeline

Raw image-text metadata in, a training-ready webdataset and a searchable CLIP index out:
the LAION-400M preprocessing as one DAG.

| stage | tool | output |
|---|---|---|
| fetch_metadata | fsspec | `raw/` |
| dedup | Spark (`spark_default`) | `dedup/part-*.parquet`, `dedup/_stats.json` |
| download_images (one per part) | img2dataset | `images/<part>/00000.tar` ... |
| clip_embeddings (pool `gpu`) | clip-retrieval | `embeddings/{img_emb,text_emb,metadata}/` |
| build_index (pool `gpu`) | autofaiss | `index/{image,text}.index` |
| report | | `report/report.json`, `report/report.html` |

Every setting is a param of the run; deployment defaults come from `LAION_*` environment
variables (see the README).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from airflow.sdk import Asset, Param, dag

from operators.dedup import DedupOperator
from operators.download import DownloadImagesOperator, ListPartsOperator
from operators.embeddings import ClipEmbeddingsOperator
from operators.fetch import FetchMetadataOperator
from operators.index import BuildIndexOperator
from operators.params import (
    CONN, DAG_ARGUMENTS, DOWNLOAD_POOL, GPU_POOL, GPU_QUEUE, ROOT, download_arguments, download_params, storage_params,
)  # fmt: skip
from operators.report import ReportOperator
from stages.search import INDEX_ASSET

CLIP_MODEL = os.environ.get("LAION_CLIP_MODEL", "open_clip:ViT-B-32/laion2b_s34b_b79k")
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
    "dedup_partitions": Param(4, type="integer", minimum=1, maximum=100000),
    "max_caption_length": Param(4096, type="integer", minimum=1, description="Captions longer than this are truncated or rejected."),
    "long_captions": Param("truncate", type="string", enum=["truncate", "reject"]),
    "bad_files": Param("fail", type="string", enum=["fail", "skip"], description="A raw file that is not CSV/parquet or has no URL column: fail the run, or move it to raw/_rejected/ and report it."),
    "image_size": Param(256, type="integer", minimum=16, maximum=4096),
    "resize_mode": Param("border", type="string", enum=["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]),
    "number_sample_per_shard": Param(10000, type="integer", minimum=1, maximum=1000000),
    **download_params(),
    "clip_model": Param(CLIP_MODEL, type="string", minLength=1, description="Any model string clip-retrieval accepts."),
    "clip_batch_size": Param(256, type="integer", minimum=1, maximum=65536),
    "max_index_memory_usage": Param("4G", type="string", pattern=r"^[0-9]+(\.[0-9]+)?[KMG]B?$"),
    "current_memory_available": Param("8G", type="string", pattern=r"^[0-9]+(\.[0-9]+)?[KMG]B?$"),
    "index_key": Param(None, type=["null", "string"], description="Force a faiss index key; empty lets autofaiss choose."),
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

    fetch = FetchMetadataOperator(task_id="fetch_metadata", metadata_urls="{{ params.metadata_urls | with_run_date }}", **stage)
    dedup = DedupOperator(
        task_id="dedup",
        partitions="{{ params.dedup_partitions }}",
        row_policy={
            "max_caption_length": "{{ params.max_caption_length }}",
            "long_captions": "{{ params.long_captions }}",
            "bad_files": "{{ params.bad_files }}",
        },
        conn_id="spark_default",
        **stage,
    )
    parts = ListPartsOperator(task_id="list_dedup_parts", **stage)
    download = DownloadImagesOperator.partial(
        task_id="download_images",
        pool=DOWNLOAD_POOL,
        map_index_template="{{ task.part }}",
        image_size="{{ params.image_size }}",
        resize_mode="{{ params.resize_mode }}",
        number_sample_per_shard="{{ params.number_sample_per_shard }}",
        **download_arguments(),
        **stage,
    ).expand(part=parts.output)
    embeddings = ClipEmbeddingsOperator(
        task_id="clip_embeddings", clip_model="{{ params.clip_model }}", batch_size="{{ params.clip_batch_size }}", **gpu, **stage
    )
    index = BuildIndexOperator(
        task_id="build_index",
        outlets=[Asset(INDEX_ASSET)],  # the search plugin reloads a run's index on its events
        max_index_memory_usage="{{ params.max_index_memory_usage }}",
        current_memory_available="{{ params.current_memory_available }}",
        index_key="{{ params.index_key }}",
        **gpu,
        **stage,
    )
    report = ReportOperator(task_id="report", **stage)

    fetch >> dedup >> parts >> download >> embeddings >> index >> report


laion_pipeline()
