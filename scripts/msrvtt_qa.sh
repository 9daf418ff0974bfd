#!/usr/bin/env bash
# EMCL-QA on MSRVTT-QA with the paper's settings (configs/msrvtt_qa.yaml), as the reference was run: 2 GPUs
# (default), global batch 32 split across them.
# Usage: scripts/msrvtt_qa.sh ANNO_DIR VIDEO_DIR [NUM_GPUS=2] [extra flags...]
#   ANNO_DIR holds train.jsonl, val.jsonl, test.jsonl and train_ans2label.json; VIDEO_DIR {video_id}.mp4
#   e.g. scripts/msrvtt_qa.sh data/msrvtt_qa data/msrvtt/videos 2 --frame_cache data/msrvtt_12x1.h5
#   add --select_on_test to pick the epoch on test as the reference did (the result is labelled so)
set -euo pipefail
anno=${1:?annotation folder}; videos=${2:?video folder}; gpus=${3:-2}
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc_per_node="$gpus" -m video_question_answering.main_task_qa \
  --config configs/msrvtt_qa.yaml --anno_path "$anno" --video_path "$videos" \
  --output_dir "runs/msrvtt_qa_${gpus}gpu" "$@"
