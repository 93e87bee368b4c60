#!/bin/bash
# R2ET fine-tune on 2 nodes with torchrun (Lightning DDP). Run this script on EACH node:
#
#   NODE_RANK=0 MASTER_ADDR=node0.example GPUS_PER_NODE=8 examples/torchrun_two_nodes.sh   # on node 0
#   NODE_RANK=1 MASTER_ADDR=node0.example GPUS_PER_NODE=8 examples/torchrun_two_nodes.sh   # on node 1
#
# MASTER_ADDR: an address of node 0 that node 1 can reach; MASTER_PORT: a free TCP port there.
# Lightning reads the layout torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK); trainer.devices
# must equal --nproc_per_node and trainer.num_nodes --nnodes, or Lightning stops with an error.
# CPU only (debugging, e.g. two "nodes" on one machine): ACCELERATOR=cpu MASTER_ADDR=127.0.0.1,
# started once with NODE_RANK=0 and once with NODE_RANK=1 (tests/test_multinode.py does this).
#
# Effective (global) batch = data.batch_size x trainer.devices x trainer.num_nodes
#                          = BATCH x GPUS_PER_NODE x 2.
# Learning rate: linear scaling rule, lr = base_lr x (global batch / base batch) with base_lr and
# base batch those of the config on one process (add warm-up when the factor is large); or keep
# the global batch (and lr) by setting BATCH = base batch / (GPUS_PER_NODE x 2).
set -euo pipefail

NODE_RANK=${NODE_RANK:?set NODE_RANK to 0 on the first node and 1 on the second}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to an address of node 0}
MASTER_PORT=${MASTER_PORT:-29500}
NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
BATCH=${BATCH:-128}
LR=${LR:-0.16}
DATA=${DATA:-data/cifar10}
ACCELERATOR=${ACCELERATOR:-gpu}
PYTHON=${PYTHON:-python}

echo "node ${NODE_RANK}/${NODES}: global batch = ${BATCH} x ${GPUS_PER_NODE} x ${NODES} = $((BATCH * GPUS_PER_NODE * NODES)), lr = ${LR}"
exec "${PYTHON}" -m torch.distributed.run \
    --nnodes="${NODES}" --node_rank="${NODE_RANK}" --nproc_per_node="${GPUS_PER_NODE}" \
    --master_addr="${MASTER_ADDR}" --master_port="${MASTER_PORT}" \
    train.py fit \
    -c configs/experiment/cifar10_r2et_finetune.yaml -c configs/trainer/ddp.yaml \
    --trainer.accelerator="${ACCELERATOR}" \
    --trainer.num_nodes="${NODES}" --trainer.devices="${GPUS_PER_NODE}" \
    --data.init_args.data_dir="${DATA}" --data.init_args.batch_size="${BATCH}" \
    --model.optimizer.init_args.lr="${LR}"
