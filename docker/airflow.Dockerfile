# One image for every Airflow role: api-server, scheduler, dag-processor, triggerer, the
# Celery workers and the init service. LAION_VARIANT=gpu builds the GPU worker's variant:
# torch's CUDA build (PyPI's default on Linux) and faiss-gpu (requirements-gpu.txt).
# Build context: the repository root (see docker-compose.yaml).
FROM python:3.11-slim-bookworm

ARG LAION_VARIANT=cpu
ARG AIRFLOW_UID=50000

# Java for spark-submit (the dedup driver runs in the worker); tini reaps task processes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid "${AIRFLOW_UID}" --create-home airflow \
 && mkdir -p /opt/airflow/logs /opt/airflow/secrets /scratch \
 && chown -R airflow /opt/airflow /scratch

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    AIRFLOW_HOME=/opt/airflow \
    PYTHONUNBUFFERED=1

RUN python -m venv /opt/venv && pip install --no-cache-dir --upgrade pip "setuptools<81" wheel

WORKDIR /opt/laion
COPY requirements.txt requirements-nodeps.txt requirements-gpu.txt ./
# The CPU variant takes torch's CPU build first: requirements.txt's pins accept its +cpu label.
RUN if [ "$LAION_VARIANT" = cpu ]; then \
        pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
            $(grep -E '^(torch|torchvision)==' requirements.txt); \
    fi \
 && pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt \
 && if [ "$LAION_VARIANT" = gpu ]; then \
        pip uninstall -y faiss-cpu && pip install --no-cache-dir -r requirements-gpu.txt; \
    fi

COPY . .
RUN pip install --no-cache-dir --no-deps -e .

USER airflow
ENTRYPOINT ["tini", "--", "airflow"]
CMD ["version"]
