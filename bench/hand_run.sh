#!/usr/bin/env bash
# The LAION chain run by hand with each tool's own command line, on the same input and settings
# as the DAG run it is compared with (bench/end_to_end.py):
#   hand_run.sh RAW_DIR OUT PARTITIONS PROCESSES THREADS SHARD_SAMPLES CLIP_MODEL BATCH
set -euo pipefail
raw=$1 out=$2 partitions=$3 processes=$4 threads=$5 shard=$6 model=$7 batch=$8
here=$(cd "$(dirname "$0")/.." && pwd)

spark-submit --master 'local[*]' --name laion-dedup "$here/stages/dedup/job.py" \
  --input "$raw" --output "$out/dedup" --partitions "$partitions"

for part in "$out"/dedup/part-*.parquet; do
  img2dataset --url_list="$part" --input_format=parquet --url_col=URL --caption_col=TEXT \
    --save_additional_columns='["SAMPLE_ID","NSFW","similarity","LICENSE"]' --output_format=webdataset \
    --output_folder="$out/images/$(basename "$part" .parquet)" --image_size=256 --resize_mode=border \
    --processes_count="$processes" --thread_count="$threads" --number_sample_per_shard="$shard" --timeout=10 \
    --encode_quality=95 --enable_wandb=False --distributor=multiprocessing
done

# clip-retrieval takes one brace pattern: the parts' tars, linked side by side.
mkdir -p "$out/tars"
n=0
for tar in "$out"/images/*/*.tar; do ln -s "$tar" "$out/tars/$(printf %05d $n).tar"; n=$((n + 1)); done
clip-retrieval inference --input_dataset="$out/tars/{00000..$(printf %05d $((n - 1)))}.tar" --output_folder="$out/embeddings" --input_format=webdataset \
  --enable_metadata=True --clip_model="$model" --batch_size="$batch" --num_prepro_workers=2

for kind in img text; do
  name=$([ "$kind" = img ] && echo image || echo text)
  autofaiss build_index --embeddings="$out/embeddings/${kind}_emb" --index_path="$out/index/$name.index" \
    --index_infos_path="$out/index/${name}_infos.json" --metric_type=ip --max_index_memory_usage=4G \
    --current_memory_available=8G --should_be_memory_mappable=True
done
