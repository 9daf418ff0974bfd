#!/usr/bin/env bash
# MMT with EMCL (USE_EMCL=1, default) or MMT's own baseline (0) on one dataset, the reference's settings
# (configs/mmt_DATASET.yaml): one GPU, batch 32, 100 epochs of 1000 iterations, as the reference.
# Usage: scripts/train_mmt.sh DATASET ANNO_DIR FEATURES BERT_DIR [USE_EMCL=1] [extra flags...]
#   DATASET: msrvtt | lsmdc | activitynet
#   FEATURES: experts.h5 from scripts/consolidate_experts.py (recommended) or the folder of per-video files
#   e.g. scripts/train_mmt.sh msrvtt data/MSRVTT data/MSRVTT/experts.h5 models/bert-base-cased 0
set -euo pipefail
dataset=${1:?dataset}; anno=${2:?split-list folder}; features=${3:?expert features}; bert=${4:?BERT folder}
use_emcl=${5:-1}
shift $(( $# < 5 ? $# : 5 ))
cd "$(dirname "$0")/.."
[ -f "configs/mmt_$dataset.yaml" ] || { echo "no config configs/mmt_$dataset.yaml" >&2; exit 2; }
exec torchrun --standalone --nproc_per_node=1 -m video_retrieval.joint_training.main_task_joint \
  --config "configs/mmt_$dataset.yaml" --anno_path "$anno" --features "$features" --bert_path "$bert" \
  --use_emcl "$use_emcl" --output_dir "runs/mmt_${dataset}_emcl${use_emcl}" "$@"
