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
# jemalloc keeps freed pages for the next step, where glibc's malloc maps and unmaps every tensor above 32 MiB (page faults)
jemalloc=$( { ldconfig -p 2>/dev/null | awk '/libjemalloc\.so\.2 /{print $NF}'; ls /usr/lib/*-linux-gnu/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2 /usr/local/lib/libjemalloc.so.2 2>/dev/null; } | head -n 1 || true)
if [ -n "$jemalloc" ] && [ -z "${LD_PRELOAD:-}${MALLOC_CONF:-}" ] && [ "${LIT_ICL_ALLOCATOR:-}" != system ]; then
  export LD_PRELOAD=$jemalloc MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1; echo "allocator: jemalloc ($jemalloc)" >&2
elif [ -n "$jemalloc" ]; then echo "allocator: system malloc (LD_PRELOAD, MALLOC_CONF or LIT_ICL_ALLOCATOR=system set)" >&2
else echo "allocator: system malloc (jemalloc not found: apt install libjemalloc2 for fewer page faults)" >&2; fi
exec .venv/bin/lit-icl fit --config "$config" "$@"
