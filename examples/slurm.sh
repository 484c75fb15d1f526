#!/bin/bash
# Pretrain across several nodes under SLURM: one torchrun per node (srun starts them), each starting one process
# per GPU; torchrun's c10d rendezvous on the job's first node joins them. No launcher of lmlab's own: this builds
# the guide's multi-node torchrun line (docs/guide.md, "Scaling out") from SLURM's variables.
#
#   sbatch examples/slurm.sh
#   LMLAB_ARGS="pretrain --model gpt2-124m --data data/ --out runs/b --strategy ddp --resume" sbatch examples/slurm.sh
#
# The run folder and data must be on a filesystem every node sees (checkpoints are written by all ranks).
#SBATCH --job-name=lmlab-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
set -euo pipefail

NODES=${SLURM_NNODES:?run under sbatch or srun}
GPUS=${SLURM_GPUS_ON_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${LMLAB_PORT:-29500}
# --resume: a requeued or restarted job continues from the latest complete checkpoint
ARGS=${LMLAB_ARGS:-pretrain --model llama-1b --data data/ --out runs/llama-1b --strategy fsdp --resume}

# shellcheck disable=SC2086 # ARGS is a list of flags
srun torchrun --nnodes "$NODES" --nproc-per-node "$GPUS" --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD:$PORT" -m lmlab.cli $ARGS
