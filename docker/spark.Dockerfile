# A Spark standalone master or worker: the Spark distribution that pyspark ships, the same
# release as the workers' spark-submit (requirements.txt), and the Python the dedup job's
# executors run (PYSPARK_PYTHON=/opt/venv/bin/python, as in the Airflow image).
# Build context: the repository root (see docker-compose.yaml).
FROM python:3.11-slim-bookworm

ARG SPARK_UID=50000

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid "${SPARK_UID}" --create-home spark \
 && mkdir -p /opt/spark/work /scratch \
 && chown -R spark /opt/spark /scratch

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

WORKDIR /opt/laion
COPY requirements.txt ./
# Only what the dedup job needs, at requirements.txt's pins.
RUN python -m venv /opt/venv \
 && grep -E '^(pyspark|pyspark-client|pyarrow|numpy|pandas|fsspec|s3fs)([=<>]|$)' requirements.txt > /tmp/spark-requirements.txt \
 && pip install --no-cache-dir -r /tmp/spark-requirements.txt
COPY stages ./stages
ENV PYTHONPATH=/opt/laion

COPY docker/spark-entrypoint.sh /usr/local/bin/spark-entrypoint
USER spark
ENTRYPOINT ["tini", "--", "spark-entrypoint"]
CMD ["master"]
