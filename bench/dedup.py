"""dedup: our Spark job (spark-submit, as the DAG submits it) vs DuckDB doing the same work.

The same work: read every raw CSV, align it to the reference columns, tag invalid rows and
count them per file and reason, keep one row per (URL, TEXT) chosen by value, keep a sample
of rejected rows, spread the rows over N parquet parts by a seeded hash.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from bench.data import raw_csvs
from bench.harness import PY, REPO, Bench, env_for_tools, run_json, run_timed
from bench.sizes import Size
from stages.layout import DEDUP_MARKER

PARTITIONS = 4
DUCKDB_MEMORY = "10GB"

DUCKDB_SQL = """
CREATE TEMP TABLE tagged AS
SELECT try_cast(SAMPLE_ID AS BIGINT) AS SAMPLE_ID, URL, TEXT,
       coalesce(try_cast(HEIGHT AS INTEGER), try_cast(try_cast(HEIGHT AS DOUBLE) AS INTEGER)) AS HEIGHT,
       coalesce(try_cast(WIDTH AS INTEGER), try_cast(try_cast(WIDTH AS DOUBLE) AS INTEGER)) AS WIDTH,
       LICENSE, NSFW, try_cast(similarity AS DOUBLE) AS similarity, filename AS _file,
       CASE WHEN URL IS NULL OR trim(URL) = '' THEN 'missing_url'
            WHEN NOT regexp_matches(URL, '^https?://[^\\s/]+', 'i') THEN 'non_http_url'
            WHEN TEXT IS NULL OR trim(TEXT) = '' THEN 'missing_caption'
            WHEN contains(URL, '\ufffd') OR contains(TEXT, '\ufffd') THEN 'invalid_utf8' END AS _reason
FROM read_csv('{raw}/*.csv', delim = '|', quote = '"', escape = '"', header = true, all_varchar = true,
              union_by_name = true, filename = true, parallel = true);
"""
DUCKDB_COUNTS = "SELECT _file, _reason, count(*) AS n FROM tagged GROUP BY ALL"
DUCKDB_REJECTED = """
COPY (SELECT _reason AS reason, _file AS file, substring(URL, 1, 2000) AS URL, substring(TEXT, 1, 2000) AS TEXT
      FROM tagged WHERE _reason IS NOT NULL
      QUALIFY row_number() OVER (PARTITION BY _reason ORDER BY _file, URL, TEXT) <= 100)
TO '{out}/rejected.parquet' (FORMAT parquet)
"""
DUCKDB_PARTS = """
COPY (SELECT * EXCLUDE (_order), _order % {parts} AS part FROM (
        SELECT SAMPLE_ID, URL, substring(TEXT, 1, 4096) AS TEXT, HEIGHT, WIDTH, LICENSE, NSFW, similarity,
               hash(URL, TEXT, 0) AS _order
        FROM tagged WHERE _reason IS NULL
        -- one row per (URL, TEXT), chosen by value; a window (which spills to disk) rather
        -- than DISTINCT ON (which ran out of memory at 10M rows)
        QUALIFY row_number() OVER (PARTITION BY URL, TEXT ORDER BY _file, SAMPLE_ID IS NULL, SAMPLE_ID, HEIGHT,
                                   WIDTH, LICENSE, NSFW, similarity) = 1)
      ORDER BY part, _order)
TO '{out}/parts' (FORMAT parquet, PARTITION_BY (part))
"""


def duckdb_dedup(raw: str, out: str, partitions: int) -> dict[str, Any]:
    """The dedup job in DuckDB, all cores, in this process."""
    import duckdb

    started = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    # Bounded, spilling to disk beyond: unbounded, the 10M-row case grew to the machine's
    # 24 GB and the kernel killed it.
    con.execute(f"SET memory_limit = '{DUCKDB_MEMORY}'")
    con.execute(f"SET temp_directory = '{out}/_duckdb_tmp'")
    con.execute("SET preserve_insertion_order = false")
    con.execute(DUCKDB_SQL.format(raw=raw))
    counts = con.execute(DUCKDB_COUNTS).fetchall()
    con.execute(DUCKDB_REJECTED.format(out=out))
    con.execute(DUCKDB_PARTS.format(out=out, parts=partitions))
    rows_out = con.execute(f"SELECT count(*) FROM read_parquet('{out}/parts/*/*.parquet')").fetchone()[0]
    return {"seconds": round(time.perf_counter() - started, 4), "rows_in": sum(n for *_, n in counts),
            "rows_out": rows_out}


def spark_command(raw: Path, out: Path) -> list[str]:
    """What DedupOperator submits through spark_default (local[*]): stages/dedup/job.py and its argv."""
    spark_submit = str(Path(PY).with_name("spark-submit"))
    return [spark_submit, "--master", "local[*]", "--name", "laion-dedup",
            str(REPO / "stages" / "dedup" / "job.py"), "--input", str(raw), "--output", str(out),
            "--partitions", str(PARTITIONS), "--seed", "0"]


def run(size: Size, work: Path) -> Bench:
    bench = Bench("dedup", settings={"partitions": PARTITIONS, "rows": list(size.dedup_rows),
                                     "rows_per_file": 250_000, "delimiter": "|"})
    cases = {}
    for rows in size.dedup_rows:
        raw = raw_csvs(work / "cache" / f"raw-{rows}", rows)
        out = work / "dedup" / f"out-{rows}"
        bench.commands[f"spark_{rows}"] = spark_command(raw, out / "spark")
        bench.commands[f"duckdb_{rows}"] = [PY, "-m", "bench.workers", "duckdb-dedup", str(raw), str(out / "duckdb"), str(PARTITIONS)]

        def spark(rep: int, rows: int = rows, out: Path = out) -> dict[str, Any]:
            shutil.rmtree(out / "spark", ignore_errors=True)
            done = run_timed(bench.commands[f"spark_{rows}"], env=env_for_tools())
            stats = __import__("json").loads((out / "spark" / DEDUP_MARKER).read_text())
            return {"seconds": done["seconds"], "rows_in": stats["rows_in"], "rows_out": stats["rows_out"],
                    "job_seconds": stats["batches"][-1]["seconds"], "rows_per_s": round(stats["rows_in"] / done["seconds"])}

        def duck(rep: int, rows: int = rows, out: Path = out) -> dict[str, Any]:
            shutil.rmtree(out / "duckdb", ignore_errors=True)
            done = run_json(bench.commands[f"duckdb_{rows}"], env=env_for_tools())
            return {**done, "seconds": done["wall_seconds"], "rows_per_s": round(done["rows_in"] / done["wall_seconds"])}

        cases[f"spark_{rows}"], cases[f"duckdb_{rows}"] = spark, duck
    med = bench.interleave(cases, size.reps)
    for rows in size.dedup_rows:
        spark, duck = med[f"spark_{rows}"], med[f"duckdb_{rows}"]
        if spark["rows_out"] != duck["rows_out"]:
            bench.notes.append(f"{rows} rows: Spark kept {spark['rows_out']} rows, DuckDB {duck['rows_out']}")
        bench.ratio(f"spark_over_duckdb_{rows}", spark["seconds"], duck["seconds"])
    largest, smallest = max(size.dedup_rows), min(size.dedup_rows)
    bench.target(f"Spark / DuckDB time at {largest:,} rows", bench.ratios[f"spark_over_duckdb_{largest}"], "<=", 4.0)
    if largest > smallest:
        # Linear growth: time ratio no larger than the row ratio (fixed start-up makes it smaller).
        growth = med[f"spark_{largest}"]["seconds"] / med[f"spark_{smallest}"]["seconds"]
        bench.target("Spark time growth / row growth", bench.ratio("spark_time_growth_over_rows", growth, largest / smallest),
                     "<=", 1.0)
    return bench
