#!/bin/bash
# dtrain MLM + NSP pretraining on Slurm, one node or many. From the repository root:
#   sbatch slurm/pretrain.sh                                      # the defaults below
#   DTRAIN_CONFIG=configs/... DTRAIN_OVERRIDES="optim.lr=1e-4" sbatch --nodes=4 slurm/pretrain.sh
# The #SBATCH lines are defaults: edit them or override them on the sbatch command line. Settings (DTRAIN_CONFIG,
# DTRAIN_OVERRIDES, DTRAIN_RUN_DIR, DTRAIN_PYTHON, ...) are environment variables, listed in slurm/common.sh.
# Keep --ntasks-per-node=1 (torchrun starts the processes of a node), --signal=B:USR2@... and --requeue
# (preemption: save, requeue, resume).
#SBATCH --job-name=dtrain-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# sbatch runs a copy of this script from its spool dir: find the repository through the submit dir
# shellcheck source=slurm/common.sh
source "${DTRAIN_HOME:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh" \
    || { echo "dtrain-slurm: error: run sbatch from the dtrain repository root or set DTRAIN_HOME" >&2; exit 2; }
dtrain_launch dtrain.pretrain configs/pretrain/bert_base_phase1.yaml
