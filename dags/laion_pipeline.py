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
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Asset, Param, dag

from operators.dedup import DedupOperator
from operators.download import DownloadImagesOperator, ListPartsOperator
from operators.embeddings import ClipEmbeddingsOperator
from operators.fetch import FetchMetadataOperator
from operators.index import BuildIndexOperator
from operators.report import ReportOperator
from stages.search import INDEX_ASSET

REPO = Path(__file__).resolve().parents[1]
OUTPUT_ROOT = os.environ.get("LAION_OUTPUT_ROOT", str(REPO / "data" / "output"))
STORAGE_CONN_ID = os.environ.get("LAION_STORAGE_CONN_ID", "laion_storage")
CLIP_MODEL = os.environ.get("LAION_CLIP_MODEL", "open_clip:ViT-B-32/laion2b_s34b_b79k")
DOWNLOAD_POOL = os.environ.get("LAION_DOWNLOAD_POOL", "download")
GPU_POOL = os.environ.get("LAION_GPU_POOL", "gpu")
GPU_QUEUE = os.environ.get("LAION_GPU_QUEUE", "gpu")
CPU_QUEUE = os.environ.get("LAION_CPU_QUEUE", "default")

ROOT = "{{ params.output_root }}"
CONN = "{{ params.storage_conn_id }}"

PARAMS = {
    "metadata_urls": Param(
        [u for u in os.environ.get("LAION_METADATA_URLS", "").split(",") if u],
        type="array", items={"type": "string", "minLength": 1}, minItems=1,
        description="Raw metadata sources: http(s)://, s3://, file:// URLs, local paths or globs.",
    ),
    "output_root": Param(OUTPUT_ROOT, type="string", minLength=1, description="Local path or s3://bucket/prefix."),
    "storage_conn_id": Param(STORAGE_CONN_ID, type="string", description="Airflow connection for s3:// output."),
    "dedup_partitions": Param(4, type="integer", minimum=1, maximum=100000),
    "max_caption_length": Param(4096, type="integer", minimum=1, description="Captions longer than this are truncated or rejected."),
    "long_captions": Param("truncate", type="string", enum=["truncate", "reject"]),
    "bad_files": Param("fail", type="string", enum=["fail", "skip"], description="A raw file that is not CSV/parquet or has no URL column: fail the run, or move it to raw/_rejected/ and report it."),
    "image_size": Param(256, type="integer", minimum=16, maximum=4096),
    "resize_mode": Param("border", type="string", enum=["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]),
    "processes_count": Param(int(os.environ.get("LAION_PROCESSES_COUNT", os.cpu_count() or 1)), type="integer", minimum=1, maximum=256),
    "thread_count": Param(int(os.environ.get("LAION_THREAD_COUNT", 32)), type="integer", minimum=1, maximum=1024),
    "number_sample_per_shard": Param(10000, type="integer", minimum=1, maximum=1000000),
    "timeout": Param(10, type="integer", minimum=1, maximum=600, description="Seconds per socket operation of an image request."),
    "allowed_networks": Param(
        [n for n in os.environ.get("LAION_ALLOWED_NETWORKS", "").split(",") if n],
        type="array", items={"type": "string", "minLength": 1},
        description="CIDRs that downloads may reach although private (loopback, LAN...). Empty: public addresses only.",
    ),
    "max_download_seconds": Param(30, type="number", exclusiveMinimum=0, maximum=3600, description="Wall-clock limit per image, redirects and waits included."),
    "max_image_bytes": Param(32 * 1024 * 1024, type="integer", minimum=1024, description="Largest body accepted."),
    "max_redirects": Param(5, type="integer", minimum=0, maximum=30),
    "max_image_pixels": Param(100_000_000, type="integer", minimum=1, description="Declared pixel count above which an image is a decompression bomb."),
    "max_retry_after_seconds": Param(10, type="number", minimum=0, maximum=600, description="Longest Retry-After (429/503) honoured."),
    "per_host_connections": Param(0, type="integer", minimum=0, description="Concurrent connections per host and worker process; 0: no cap."),
    "clip_model": Param(CLIP_MODEL, type="string", minLength=1, description="Any model string clip-retrieval accepts."),
    "clip_batch_size": Param(256, type="integer", minimum=1, maximum=65536),
    "max_index_memory_usage": Param("4G", type="string", pattern=r"^[0-9]+(\.[0-9]+)?[KMG]B?$"),
    "current_memory_available": Param("8G", type="string", pattern=r"^[0-9]+(\.[0-9]+)?[KMG]B?$"),
    "index_key": Param(None, type=["null", "string"], description="Force a faiss index key; empty lets autofaiss choose."),
}


@dag(
    dag_id="laion_pipeline",
    schedule=None,
    params=PARAMS,
    doc_md=__doc__,
    tags=["laion", "images", "clip"],
    max_active_runs=1,
    render_template_as_native_obj=True,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=10),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
        "queue": CPU_QUEUE,
    },
)
def laion_pipeline() -> None:
    stage = {"output_root": ROOT, "storage_conn_id": CONN}
    gpu = {"pool": GPU_POOL, "queue": GPU_QUEUE}

    fetch = FetchMetadataOperator(task_id="fetch_metadata", metadata_urls="{{ params.metadata_urls }}", **stage)
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
        processes_count="{{ params.processes_count }}",
        thread_count="{{ params.thread_count }}",
        number_sample_per_shard="{{ params.number_sample_per_shard }}",
        timeout="{{ params.timeout }}",
        fetch_policy={
            "allowed_networks": "{{ params.allowed_networks }}",
            "max_seconds": "{{ params.max_download_seconds }}",
            "max_bytes": "{{ params.max_image_bytes }}",
            "max_redirects": "{{ params.max_redirects }}",
            "max_pixels": "{{ params.max_image_pixels }}",
            "max_retry_after": "{{ params.max_retry_after_seconds }}",
            "per_host_connections": "{{ params.per_host_connections }}",
        },
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
