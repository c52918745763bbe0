"""Search a finished laion_pipeline run and read its report, inside Airflow's UI (see api.py)."""
