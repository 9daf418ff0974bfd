#!/usr/bin/env bash
# EMCL-Net with the paper's settings for one dataset (configs/DATASET.yaml), as the reference's tables were
# made: 8 GPUs (default) or 2. The global batch (128) is split across the GPUs.
# Usage: scripts/train.sh DATASET ANNO_DIR VIDEO_DIR [NUM_GPUS=8] [extra flags...]
#   DATASET: msrvtt | msvd | lsmdc | activitynet | didemo
#   e.g. scripts/train.sh msrvtt data/msrvtt/anno data/msrvtt/videos 2 --frame_cache data/msrvtt_12x1.h5
set -euo pipefail
dataset=${1:?dataset}; anno=${2:?annotation folder}; videos=${3:?video folder}; gpus=${4:-8}
shift $(( $# < 4 ? $# : 4 ))
cd "$(dirname "$0")/.."
[ -f "configs/$dataset.yaml" ] || { echo "no config configs/$dataset.yaml" >&2; exit 2; }
out="runs/${dataset}_${gpus}gpu"
torchrun --standalone --nproc_per_node="$gpus" -m video_retrieval.emcl_net.main_task_retrieval \
  --config "configs/$dataset.yaml" --anno_path "$anno" --video_path "$videos" \
  --output_dir "$out" "$@"
echo "finished: $out/metrics.json. The paper's table from every finished run, beside the paper's numbers:"
echo "  python scripts/paper_table.py runs/*/metrics.json --out runs/paper_table"
