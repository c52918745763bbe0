"""
# laion_export_subset

Writes a `laion_pipeline` dataset's curated subset as webdataset under `<output_root>/subset/`:
the samples the curation kept, or, given `subset_keys`, the samples listed in that file (one
sample key per line; local, s3:// or http(s)://). Each source shard with a selected sample
becomes `subset/<shard>.tar` holding every file of each selected sample, with
`<shard>.parquet` and `<shard>_stats.json`; `subset/_SUCCESS.json` counts the whole. A key
the dataset does not hold is counted (`keys_not_found`), not an error.

Trigger it with the dataset's `output_root`. A rerun rewrites only the shards whose
selection changed and removes those left without a selected sample.
"""

from __future__ import annotations

from airflow.sdk import dag

from operators.export import ExportSubsetOperator
from operators.params import CONN, DAG_ARGUMENTS, ROOT, params_of, storage_params, templates_of
from stages.curate.export import ExportSettings


@dag(
    dag_id="laion_export_subset",
    schedule=None,
    params={**storage_params(), **params_of(ExportSettings)},
    doc_md=__doc__,
    tags=["laion", "curation"],
    **DAG_ARGUMENTS,
)
def laion_export_subset() -> None:
    ExportSubsetOperator(task_id="export_subset", settings=templates_of(ExportSettings), output_root=ROOT, storage_conn_id=CONN)


laion_export_subset()
