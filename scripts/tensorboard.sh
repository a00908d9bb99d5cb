#!/usr/bin/env bash
# Open TensorBoard on the training logs: scripts/tensorboard.sh [LOGDIR] [extra tensorboard args]
#
# TensorBoard listens on localhost only (its own default): the run's logs are not served to the
# network. From another machine, forward the port over SSH and open http://localhost:6006 there:
#     ssh -L 6006:localhost:6006 user@training-host
# To serve on every network interface instead (anyone who can reach the machine reads the logs),
# opt in by passing TensorBoard's own flag through:
#     scripts/tensorboard.sh lightning_logs --bind_all      (or: scripts/tensorboard.sh --bind_all)
set -euo pipefail
cd "$(dirname "$0")/.."
logdir=lightning_logs
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a first argument that is not a flag is the log directory
  logdir=$1
  shift
fi
[ -d "$logdir" ] || { echo "tensorboard.sh: no log directory '$logdir' (train first: scripts/demo.sh)" >&2; exit 1; }
bash scripts/setup.sh
exec .venv/bin/tensorboard --logdir "$logdir" "$@"
