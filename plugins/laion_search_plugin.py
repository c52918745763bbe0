"""Search the built index and read each run's report inside the Airflow UI.

Mounts the laion_search FastAPI app in the API server at /laion and adds its pages to the
UI: "Image search" and "Run reports" in the navigation, and a "Report" tab on every run.
Importing this file loads no model or index: that happens on the first request.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from laion_search.api import app

PREFIX = "laion"


class LaionSearchPlugin(AirflowPlugin):
    name = "laion_search"
    fastapi_apps = [{"app": app, "url_prefix": f"/{PREFIX}", "name": "laion_pipeline search"}]
    # href without a leading slash: relative to the API server's base_url.
    external_views = [
        {
            "name": "Image search",
            "href": f"{PREFIX}/search",
            "destination": "nav",
            "url_route": "laion-search",
            "icon": f"{PREFIX}/static/search.svg",
            "nav_top_level": True,
        },
        {
            "name": "Run reports",
            "href": f"{PREFIX}/reports",
            "destination": "nav",
            "url_route": "laion-reports",
            "icon": f"{PREFIX}/static/report.svg",
            "nav_top_level": True,
        },
        {
            "name": "Report",
            "href": f"{PREFIX}/report?dag_id={{DAG_ID}}&run={{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "laion-run-report",
        },
    ]
