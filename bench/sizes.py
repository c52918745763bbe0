"""The scales `make bench SIZE=...` runs at. small: a few minutes on 2 cores; medium: about 20."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    reps: int
    images: int  # download: distinct JPEGs served, one row each
    shard_samples: int  # download: img2dataset's number_sample_per_shard for stage and CLI alike
    dedup_rows: tuple[int, ...]  # dedup: raw rows per case (before duplicates and invalid rows)
    embed_samples: int  # embeddings: samples in the tars
    embed_batch: int
    index_vectors: tuple[int, ...]
    index_queries: int
    mapped_tasks: tuple[int, ...]  # orchestration: N empty mapped tasks
    e2e_images: int  # end to end: rows of the raw metadata
    # index: a compressed key forced beside autofaiss's choice, to measure re-ranking (OPQ
    # training is the slow part: 16 x 64-d keeps it to about a minute at 100k on 2 cores).
    index_pq_key: str = "OPQ16_64,IVF1024,PQ16x8"


SIZES = {
    "tiny": Size(reps=1, images=48, shard_samples=24, dedup_rows=(20_000,), embed_samples=32, embed_batch=16,
                 index_vectors=(5_000,), index_queries=100, mapped_tasks=(2,), e2e_images=40,
                 index_pq_key="OPQ16_64,IVF64,PQ16x8"),
    "small": Size(reps=3, images=800, shard_samples=200, dedup_rows=(1_000_000,), embed_samples=128,
                  embed_batch=64, index_vectors=(100_000,), index_queries=500, mapped_tasks=(16,), e2e_images=120,
                  index_pq_key="OPQ16_64,IVF256,PQ16x8"),
    # 256 mapped tasks take about 10 minutes here (dag.test runs them one by one): under large only.
    "medium": Size(reps=3, images=1_600, shard_samples=400, dedup_rows=(1_000_000, 3_000_000), embed_samples=1_024,
                   embed_batch=128, index_vectors=(100_000, 1_000_000), index_queries=1_000,
                   mapped_tasks=(16, 64), e2e_images=300),
    "large": Size(reps=3, images=20_000, shard_samples=5_000, dedup_rows=(1_000_000, 10_000_000),
                  embed_samples=4_096, embed_batch=256, index_vectors=(100_000, 1_000_000), index_queries=1_000,
                  mapped_tasks=(16, 64, 256), e2e_images=2_000),
}
