#!/usr/bin/env bash
# The main job: set up .venv, train the quickstart linear-attention LM on associative recall
# (a few minutes on a 2-core CPU) and print the in-context-learning summary: zero-shot,
# prompted and converted accuracy on held-out episodes, and the prompted-vs-converted logit
# difference. Extra arguments go to `lit-icl fit` (e.g. --trainer.max_steps 300).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# OpenMP threads that sleep instead of spin: on a busy machine spinning threads made training
# 25x slower (0.4 vs 10.7 steps/s measured with another process on one of the two cores).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# jemalloc keeps freed pages for the next step, where glibc's malloc maps and unmaps every tensor above 32 MiB (page faults)
jemalloc=$( { ldconfig -p 2>/dev/null | awk '/libjemalloc\.so\.2 /{print $NF}'; ls /usr/lib/*-linux-gnu/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2 /usr/local/lib/libjemalloc.so.2 2>/dev/null; } | head -n 1 || true)
if [ -n "$jemalloc" ] && [ -z "${LD_PRELOAD:-}${MALLOC_CONF:-}" ] && [ "${LIT_ICL_ALLOCATOR:-}" != system ]; then
  export LD_PRELOAD=$jemalloc MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1; echo "allocator: jemalloc ($jemalloc)" >&2
elif [ -n "$jemalloc" ]; then echo "allocator: system malloc (LD_PRELOAD, MALLOC_CONF or LIT_ICL_ALLOCATOR=system set)" >&2
else echo "allocator: system malloc (jemalloc not found: apt install libjemalloc2 for fewer page faults)" >&2; fi
start=$(date +%s)
run=demo-$(date +%Y%m%d-%H%M%S)  # one folder per run: checkpoints/$run/, lightning_logs/$run/
.venv/bin/lit-icl fit --config configs/quickstart.yaml --run_name "$run" "$@"
echo
echo "demo: finished in $(( $(date +%s) - start )) s."
[ -f "checkpoints/$run/last.ckpt" ] && echo "demo: last checkpoint: checkpoints/$run/last.ckpt"
echo "demo: open the logs with  scripts/tensorboard.sh   (TensorBoard on lightning_logs/$run)"
