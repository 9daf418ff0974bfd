#!/usr/bin/env bash
# EMCL-Net with the paper's settings for one dataset (configs/DATASET.yaml), as the reference's tables were
# made: 8 GPUs (default) or 2. The global batch (128) is split across all GPUs of all nodes.
#
# One node:
#   scripts/train.sh DATASET ANNO_DIR VIDEO_DIR [GPUS_PER_NODE=8] [extra flags...]
#   DATASET: msrvtt | msvd | lsmdc | activitynet | didemo
#   e.g. scripts/train.sh msrvtt data/msrvtt/anno data/msrvtt/videos 2 --frame_cache data/msrvtt_12x1.h5
#
# Several nodes: run the same command on every node (scripts/slurm_train.sbatch does it under SLURM),
# with torchrun's rendezvous options before DATASET:
#   scripts/train.sh --nnodes 2 --rdzv_endpoint HOST:29500 [--rdzv_id JOB] DATASET ANNO VIDEOS 8 [flags]
#     c10d rendezvous at HOST (any node; the first to arrive hosts it); global ranks are assigned there.
#   scripts/train.sh --nnodes 2 --node_rank R --rdzv_endpoint HOST0:29500 DATASET ANNO VIDEOS 8 [flags]
#     static rendezvous: node R gets global ranks R*GPUS.. (R+1)*GPUS-1; HOST0 must be node 0.
# NNODES / NODE_RANK / RDZV_ENDPOINT / RDZV_ID in the environment work as the options do.
# Rank-0 work (log file, checkpoints, metrics, a synthetic dataset or frame cache) is done by global
# rank 0 only: the output folder, data and frame cache must be on a file system every node sees.
# EMCL_DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail
nnodes=${NNODES:-1}; node_rank=${NODE_RANK:-}; endpoint=${RDZV_ENDPOINT:-}; rdzv_id=${RDZV_ID:-emcl}
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) nnodes=${2:?--nnodes N}; shift 2 ;;
    --node_rank) node_rank=${2:?--node_rank R}; shift 2 ;;
    --rdzv_endpoint) endpoint=${2:?--rdzv_endpoint HOST:PORT}; shift 2 ;;
    --rdzv_id) rdzv_id=${2:?--rdzv_id ID}; shift 2 ;;
    --*) echo "unknown launcher option $1 (launcher options come before DATASET)" >&2; exit 2 ;;
    *) break ;;
  esac
done
dataset=${1:?dataset}; anno=${2:?annotation folder}; videos=${3:?video folder}; gpus=${4:-8}
shift $(( $# < 4 ? $# : 4 ))
cd "$(dirname "$0")/.."
[ -f "configs/$dataset.yaml" ] || { echo "no config configs/$dataset.yaml" >&2; exit 2; }
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || { echo "--nnodes must be a positive integer, got '$nnodes'" >&2; exit 2; }
if [ "$nnodes" -eq 1 ]; then
  launch=(--standalone --nnodes=1 --nproc_per_node="$gpus")
  out="runs/${dataset}_${gpus}gpu"
else
  [ -n "$endpoint" ] || { echo "--nnodes $nnodes needs --rdzv_endpoint HOST:PORT" >&2; exit 2; }
  launch=(--nnodes="$nnodes" --nproc_per_node="$gpus" --rdzv_endpoint="$endpoint" --rdzv_id="$rdzv_id")
  if [ -n "$node_rank" ]; then
    launch+=(--rdzv_backend=static --node_rank="$node_rank")
  else
    launch+=(--rdzv_backend=c10d)
  fi
  out="runs/${dataset}_${nnodes}x${gpus}gpu"
fi
cmd=(torchrun "${launch[@]}" -m video_retrieval.emcl_net.main_task_retrieval
  --config "configs/$dataset.yaml" --anno_path "$anno" --video_path "$videos" --output_dir "$out" "$@")
if [ -n "${EMCL_DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
"${cmd[@]}"
echo "finished: $out/metrics.json. The paper's table from every finished run, beside the paper's numbers:"
echo "  python scripts/paper_table.py runs/*/metrics.json --out runs/paper_table"
