#!/usr/bin/env bash
# One node, any number of processes: torchrun starts NPROC ranks of `sgtm train`.
#
#   launch/local.sh [-n NPROC] CONFIG [--resume] [key=value ...]
#
#   -n NPROC   processes on this node (default: $NPROC_PER_NODE, else one per visible GPU, else 1)
#
# Multi-node (one call per node; slurm/train.sbatch does this in its torchrun mode): set
#   NNODES=N  NODE_RANK=i  RDZV_ENDPOINT=host:port  [RDZV_ID=job-id]  [LOCAL_ADDR=this node's address]
# and every node's agent joins a c10d rendezvous hosted on RDZV_ENDPOINT's host.
# Single node: the rendezvous and every rank stay on 127.0.0.1.
# Env: PYTHON (default .venv/bin/python), SGTM_SITE_ENV (site config, default launch/site_env.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

nproc=${NPROC_PER_NODE:-}
while getopts ":n:h" opt; do
  case $opt in
    n) nproc=$OPTARG ;;
    h) usage 0 ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || usage
config=$1
shift
[ -f "$config" ] || { echo "local.sh: config not found: $config" >&2; exit 2; }
nproc=${nproc:-$(sgtm_default_nproc)}

sgtm_site_env
py=$(sgtm_python)
nnodes=${NNODES:-1}
if [ "$nnodes" -gt 1 ]; then
  : "${RDZV_ENDPOINT:?local.sh: NNODES>1 needs RDZV_ENDPOINT=host:port (the first node)}"
  rdzv=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
        --rdzv-id "${RDZV_ID:-sgtm}" ${NODE_RANK:+--node-rank "$NODE_RANK"})
  # The address the other nodes use to reach this one's ranks (rank 0's becomes MASTER_ADDR).
  [ -n "${LOCAL_ADDR:-}" ] && rdzv+=(--local-addr "$LOCAL_ADDR")
else
  port=${MASTER_PORT:-$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  rdzv=(--nnodes 1 --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$port" --rdzv-id local
        --local-addr "${LOCAL_ADDR:-127.0.0.1}")
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
fi
if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  # Two CPU ranks each using every core would oversubscribe the machine.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
fi

# torchrun forwards SIGTERM to the ranks, which checkpoint at the next step and exit 0.
exec "$py" -m torch.distributed.run --nproc-per-node "$nproc" "${rdzv[@]}" --max-restarts 0 \
  -m pipeline train --config "$config" "$@"
