#!/bin/sh
# master | worker: a Spark standalone daemon in the foreground. Spark reads its settings
# from SPARK_MASTER_HOST/_PORT/_WEBUI_PORT/_OPTS and SPARK_WORKER_CORES/_MEMORY/_DIR/_WEBUI_PORT;
# a worker registers with SPARK_MASTER_URL.
set -eu
case "${1:-}" in
    master) exec spark-class org.apache.spark.deploy.master.Master ;;
    worker) exec spark-class org.apache.spark.deploy.worker.Worker "${SPARK_MASTER_URL:?SPARK_MASTER_URL is not set}" ;;
    *) exec "$@" ;;
esac
