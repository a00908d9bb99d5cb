#!/usr/bin/env bash
# Train from a config on one process, several GPUs (DDP) or several nodes:
#   scripts/train.sh configs/quickstart.yaml [lit-icl fit overrides ...]
#   scripts/train.sh configs/quickstart.yaml --trainer.accelerator gpu --trainer.devices 8 --trainer.strategy ddp
# Resume after a crash with:  scripts/train.sh CONFIG --ckpt_path last
# Under torchrun or srun every process runs this script: run scripts/setup.sh once first; the
# launched processes then skip the setup (they see RANK / SLURM_PROCID) and never race on .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then echo "usage: scripts/train.sh CONFIG [lit-icl fit overrides...]" >&2; exit 2; fi
config=$1; shift
if [ ! -f "$config" ]; then echo "train.sh: no config file '$config'" >&2; exit 2; fi
if [ -z "${RANK:-}${SLURM_PROCID:-}" ]; then bash scripts/setup.sh; fi
if [ ! -x .venv/bin/lit-icl ]; then echo "train.sh: .venv is not set up (run scripts/setup.sh once)" >&2; exit 2; fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # sleep, do not spin, when cores are shared
exec .venv/bin/lit-icl fit --config "$config" "$@"
