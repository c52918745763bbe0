# The project's commands. `make demo` and `make test` need nothing but Python 3.11 and Java 17.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# The embedded default: Airflow on SQLite, Spark local, artifacts on local disk.
export PATH := $(VENV)/bin:$(PATH)
export AIRFLOW_HOME ?= $(CURDIR)/data/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__UNIT_TEST_MODE ?= False
export AIRFLOW_CONN_SPARK_DEFAULT ?= {"conn_type": "spark", "host": "local[*]"}
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(PY)
export PYSPARK_DRIVER_PYTHON := $(PY)
export NO_ALBUMENTATIONS_UPDATE := 1
export LAION_OUTPUT_ROOT ?= $(CURDIR)/data/output
export AIRFLOW__API__HOST ?= 127.0.0.1
# The search plugin also offers these output roots (the demo's run may come from another AIRFLOW_HOME).
export LAION_SEARCH_ROOTS ?= $(CURDIR)/data/demo/output

.PHONY: venv demo test run up clean browser cluster-deps test-cluster

venv: $(VENV)/.installed

# pip's output (resolver warnings included) goes to install.log; its tail is shown when it fails.
$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	@mkdir -p $(VENV) && echo "installing the venv (log: $(VENV)/install.log)"
	@pip="$(PIP) install --quiet --disable-pip-version-check"; { \
	  { test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV); } && \
	  $$pip --upgrade pip "setuptools<81" wheel && \
	  $$pip -r requirements.txt && \
	  $$pip --no-deps -r requirements-nodeps.txt && \
	  $$pip --no-deps -e . ; \
	} > $(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log >&2; echo "venv install failed; full log: $(VENV)/install.log" >&2; exit 1; }
	@touch $@

demo: venv
	@$(PY) scripts/demo.py

test: venv browser cluster-deps
	$(PY) -m pytest -q tests

# Debian's Chromium for the browser tests (Playwright drives it; no browser is downloaded).
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The loopback cluster's servers from Debian (tests/cluster starts them itself, on free ports).
cluster-deps:
	command -v redis-server >/dev/null && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql redis-server)

# docker-compose.yaml's topology on 127.0.0.1 and the compose file's checks (also part of `make test`).
test-cluster: venv cluster-deps
	$(PY) -m pytest -q tests/cluster

# Stage lines in the terminal; the full log in data/logs/ (run_dag.py migrates the database too).
run: venv
	@test -n "$(CONF)" || (echo "usage: make run CONF=path/to/conf.json" >&2; exit 2)
	@$(PY) scripts/run_dag.py $(CONF)

up: venv
	$(PY) scripts/setup_airflow.py
	$(VENV)/bin/airflow standalone

clean:
	rm -rf data/demo data/output data/airflow test-output

# `make bench SIZE=small|medium|large`: each stage against the bare tool and the compute limit
# (bench/; results in bench/results/<date>-<size>.json, table in docs/benchmarks.md).
SIZE ?= small
.PHONY: bench bench-deps
bench: venv bench-deps
	$(PY) -m bench --size $(SIZE)

# Debian's nginx serves the download benchmarks' images on 127.0.0.1.
bench-deps:
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light)
