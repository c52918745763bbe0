"""What ``laion_pipeline`` and ``laion_retry_failed`` share: deployment defaults, the params
of storage, params and templates from settings dataclasses, and the run-date templating of params.

Deployment defaults come from ``LAION_*`` environment variables (see the README).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import jinja2
from airflow.sdk import Param

from stages.settings import default_of, param_fields
from stages.storage import StorageSettings

DOWNLOAD_POOL = os.environ.get("LAION_DOWNLOAD_POOL", "download")
GPU_POOL = os.environ.get("LAION_GPU_POOL", "gpu")
GPU_QUEUE = os.environ.get("LAION_GPU_QUEUE", "gpu")
CPU_QUEUE = os.environ.get("LAION_CPU_QUEUE", "default")

DEFAULT_ARGS = {
    "retries": int(os.environ.get("LAION_TASK_RETRIES", 3)),
    "retry_delay": timedelta(seconds=float(os.environ.get("LAION_RETRY_DELAY_SECONDS", 10))),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "queue": CPU_QUEUE,
}

# Templates of the stage operators' common arguments: params rendered with the run's date.
ROOT = "{{ params.output_root | with_run_date }}"
CONN = "{{ params.storage_conn_id }}"


@jinja2.pass_context
def with_run_date(context: jinja2.runtime.Context, value: Any) -> Any:
    """Render a param's own ``{{ ds }}``-style templates (a string or a list of them).

    A param's value is not a template to Airflow; this filter makes ``output_root`` and
    ``metadata_urls`` one, so a scheduled or backfilled run reads and writes its date's
    partition: ``"s3://meta/{{ ds }}/*.parquet"``, ``"s3://laion/runs/{{ ds_nodash }}"``.
    """
    if isinstance(value, (list, tuple)):
        return [with_run_date(context, v) for v in value]
    if not isinstance(value, str) or "{" not in value:
        return value
    try:
        return context.environment.from_string(value).render(context.get_all())
    except jinja2.UndefinedError as error:
        raise ValueError(
            f"param value {value!r} uses a run date template, but {error}: "
            "trigger the run with a logical date (or through a schedule or backfill)"
        ) from None


FILTERS = {"with_run_date": with_run_date}
# What both DAGs are: one run at a time per DAG, native params, run-date templating, retries.
DAG_ARGUMENTS = {
    "max_active_runs": 1,
    "render_template_as_native_obj": True,
    "user_defined_filters": FILTERS,
    "default_args": DEFAULT_ARGS,
}


def storage_params() -> dict[str, Param]:
    return params_of(StorageSettings)


def params_of(settings_class: type, *, exclude: tuple[str, ...] = ()) -> dict[str, Param]:
    """The trigger form's params for a settings dataclass: one per field, same name, same
    default, the field's JSON schema and description (see :mod:`stages.settings`)."""
    return {
        field.name: Param(default_of(field), **field.metadata["param"])
        for field in param_fields(settings_class)
        if field.name not in exclude
    }


def templates_of(settings_class: type, *, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """An operator's templated ``settings`` for a settings dataclass: each field from its param."""
    return {field.name: f"{{{{ params.{field.name} }}}}" for field in param_fields(settings_class) if field.name not in exclude}
