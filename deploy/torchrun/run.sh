#!/usr/bin/env bash
# tensorcom with plain torchrun across nodes. Start the data servers first, one per data host:
#
#   PYTHONPATH=deploy tensorcom serve data:make --bind zrep://0.0.0.0:7880 --workers 30
#
# then run this script on every GPU node with the same MASTER_ADDR and NNODES and its own NODE_RANK:
#
#   DATA_SERVERS='zreq://data{1..4}:7880' MASTER_ADDR=gpu1 NNODES=2 NODE_RANK=0 deploy/torchrun/run.sh
#
# torchrun gives every rank RANK, WORLD_SIZE and LOCAL_RANK; train.py --distributed joins the process group,
# and its Connection takes rank and world size from torch.distributed. See docs/deploy.md.
set -euo pipefail

: "${DATA_SERVERS:?set DATA_SERVERS to the zreq URLs of the data servers, e.g. zreq://data{1..4}:7880}"
: "${MASTER_ADDR:?set MASTER_ADDR to the host name of the node with NODE_RANK=0}"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
[[ $GPUS_PER_NODE -gt 0 ]] || GPUS_PER_NODE=1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

exec torchrun \
    --nnodes="$NNODES" \
    --node-rank="$NODE_RANK" \
    --nproc-per-node="$GPUS_PER_NODE" \
    --master-addr="$MASTER_ADDR" \
    --master-port="$MASTER_PORT" \
    "$HERE/../train.py" --distributed --servers "$DATA_SERVERS" --seed 17 \
    --checkpoint "${CHECKPOINT:-$PWD/checkpoint.json}" "$@"
