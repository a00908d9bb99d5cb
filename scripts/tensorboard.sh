#!/usr/bin/env bash
# Open TensorBoard on the training logs: scripts/tensorboard.sh [LOGDIR] [extra tensorboard args]
set -euo pipefail
cd "$(dirname "$0")/.."
logdir=${1:-lightning_logs}
shift || true
[ -d "$logdir" ] || { echo "tensorboard.sh: no log directory '$logdir' (train first: scripts/demo.sh)" >&2; exit 1; }
bash scripts/setup.sh
exec .venv/bin/tensorboard --logdir "$logdir" --bind_all "$@"
