"""
# laion_remove_batch

Takes one batch of raw files back out of a `laion_pipeline` dataset (for example a raw file
found to be bad): its rows, shards and embeddings are deleted and the index is rebuilt
from the remaining vectors without retraining (they are added again to the trained index).
The other batches are not touched. The batch's raw files stay in `raw/` and later runs
leave them out; the report and `dedup/_stats.json` list the batches by number.

Trigger it with the dataset's `output_root` and the `batch` number.
"""

from __future__ import annotations

from airflow.sdk import Asset, Param, TriggerRule, dag

from operators.index import BuildIndexOperator
from operators.params import CONN, DAG_ARGUMENTS, GPU_POOL, GPU_QUEUE, ROOT, params_of, storage_params, templates_of
from operators.remove_batch import RemoveBatchOperator
from operators.curate import CurateOperator
from operators.report import ReportOperator
from stages.index import INDEX_ASSET
from stages.index.build import IndexSettings


@dag(
    dag_id="laion_remove_batch",
    schedule=None,
    params={
        **storage_params(),
        "batch": Param(0, type="integer", minimum=0, description="The batch to remove, by its number in the report."),
        **params_of(IndexSettings),
    },
    doc_md=__doc__,
    tags=["laion"],
    **DAG_ARGUMENTS,
)
def laion_remove_batch() -> None:
    stage = {"output_root": ROOT, "storage_conn_id": CONN}
    remove = RemoveBatchOperator(task_id="remove_batch", batch="{{ params.batch }}", **stage)
    index = BuildIndexOperator(
        task_id="build_index", outlets=[Asset(INDEX_ASSET)], settings=templates_of(IndexSettings),
        pool=GPU_POOL, queue=GPU_QUEUE, **stage,
    )  # fmt: skip
    report = ReportOperator(task_id="report", trigger_rule=TriggerRule.ALL_DONE, **stage)
    # Curation again with the settings it last ran with: the removed batch's samples leave curated/.
    curate = CurateOperator(task_id="curate", pool=GPU_POOL, queue=GPU_QUEUE, **stage)
    remove >> curate >> index >> report


laion_remove_batch()
