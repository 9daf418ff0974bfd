#!/usr/bin/env bash
# EMCL-Net on msvd with the paper's settings (configs/msvd.yaml), as the reference's tables were made.
# Usage: scripts/train_msvd.sh ANNO_DIR VIDEO_DIR [NUM_GPUS=8] [extra flags, e.g. --frame_cache F.h5 --eval_block paper]
# The global batch (128) is split across the GPUs; 2 GPUs give 64 per GPU.
set -euo pipefail
anno=${1:?annotation folder}; videos=${2:?video folder}; gpus=${3:-8}
shift $(( $# < 3 ? $# : 3 ))
torchrun --standalone --nproc_per_node="$gpus" -m video_retrieval.emcl_net.main_task_retrieval \
  --config configs/msvd.yaml --anno_path "$anno" --video_path "$videos" \
  --output_dir "runs/msvd_${gpus}gpu" "$@"
