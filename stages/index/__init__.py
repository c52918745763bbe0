"""build_index: the knn indexes of a run, built once and then grown in place batch by batch
(:mod:`stages.index.build`), the exact inner products over the stored embeddings that
measure their recall and re-rank a compressed index's candidates (:mod:`stages.index.rerank`),
and the files a search service reads beside them (:mod:`stages.index.search_files`).

Kept free of heavy imports: the DAG file and the search plugin import it at parse time.
"""

from __future__ import annotations

# The Airflow Asset that build_index updates: a search service reloads a run's index on its events.
INDEX_ASSET = "laion_index"
