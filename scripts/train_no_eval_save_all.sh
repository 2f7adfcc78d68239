#!/usr/bin/env bash
# The no-evaluation entry point: training, every checkpoint kept, launched with torchrun.
# Every setting can be overridden from the environment, e.g.
#   NUM_GPUS=8 CONFIG=configs/food101_no_eval_save_all.yaml bash scripts/train_no_eval_save_all.sh
# Multi-node: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 on each node. Extra arguments go to `qwen-cls fit`.
set -euo pipefail
CONFIG=${CONFIG:-configs/food101_no_eval_save_all.yaml}
NUM_GPUS=${NUM_GPUS:-4}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}

exec torchrun \
    --nproc_per_node="$NUM_GPUS" \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$MASTER_PORT" \
    -m qwen_cls fit --config "$CONFIG" \
    --trainer.devices="$NUM_GPUS" --trainer.num_nodes="$NNODES" "$@"
