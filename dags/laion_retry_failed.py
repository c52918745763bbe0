"""
# laion_retry_failed

Downloads again only the samples of a `laion_pipeline` dataset whose download failed for a
transient reason: timeouts, DNS and connection errors, HTTP 429 and 5xx. Permanent
failures (404, 403, undecodable images...) are never requested again.

Trigger it with the dataset's `output_root`. Recovered samples land in new shards of the
same parts (`images/<part>/0000050000.tar`...); the next `laion_pipeline` run over the same
`output_root` embeds and indexes them, and its report counts them, redoing nothing else.
"""

from __future__ import annotations

from airflow.sdk import dag

from operators.download import ListPartsOperator, RetryFailedSamplesOperator
from operators.params import CONN, DAG_ARGUMENTS, DOWNLOAD_POOL, ROOT, params_of, storage_params, templates_of
from stages.images.download import IMAGE_SETTINGS
from stages.images.retry import RetrySettings


@dag(
    dag_id="laion_retry_failed",
    schedule=None,
    # The image settings are not asked for: a retry reuses those the part was downloaded with.
    params={**storage_params(), **params_of(RetrySettings, exclude=IMAGE_SETTINGS)},
    doc_md=__doc__,
    tags=["laion", "images"],
    **DAG_ARGUMENTS,
)
def laion_retry_failed() -> None:
    stage = {"output_root": ROOT, "storage_conn_id": CONN}
    parts = ListPartsOperator(task_id="list_dedup_parts", pending_only=False, **stage)
    RetryFailedSamplesOperator.partial(
        task_id="retry_failed_samples",
        pool=DOWNLOAD_POOL,
        map_index_template="{{ task.part }}",
        settings=templates_of(RetrySettings, exclude=IMAGE_SETTINGS),
        **stage,
    ).expand(part=parts.output)


laion_retry_failed()
