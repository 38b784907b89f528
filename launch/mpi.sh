#!/usr/bin/env bash
# mpirun launcher: every MPI rank runs `sgtm train`; ranks are discovered through mpi4py
# (pipeline/backend/distributed.py), and MASTER_ADDR/MASTER_PORT here name the rendezvous for
# torch.distributed (NCCL on GPUs, Gloo on CPUs).
#
#   launch/mpi.sh -n NP [-H HOSTFILE] CONFIG [--resume] [key=value ...]
#
#   -n NP        total ranks (one per GPU)
#   -H HOSTFILE  Open MPI hostfile ("node1 slots=8" per line). Without it everything runs on this
#                node and MPI, Gloo and the rendezvous are confined to loopback.
# Env: MASTER_ADDR (default: first host of HOSTFILE, else 127.0.0.1), MASTER_PORT (29500),
#      MPIRUN (default mpirun), MPIRUN_ARGS (extra mpirun flags, e.g. "--oversubscribe"),
#      PYTHON, SGTM_SITE_ENV (site config, default launch/site_env.sh).
# Needs Open MPI and mpi4py in the venv (pip install mpi4py==4.1.2, built against the system MPI).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

np="" hostfile=""
while getopts ":n:H:h" opt; do
  case $opt in
    n) np=$OPTARG ;;
    H) hostfile=$OPTARG ;;
    h) usage 0 ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ -n "$np" ] && [ $# -ge 1 ] || usage
config=$1
shift
[ -f "$config" ] || { echo "mpi.sh: config not found: $config" >&2; exit 2; }

sgtm_site_env
py=$(sgtm_python)
mpirun=${MPIRUN:-mpirun}
args=(-np "$np" --bind-to none --map-by slot)
[ "$(id -u)" -eq 0 ] && args+=(--allow-run-as-root)
if [ -n "$hostfile" ]; then
  args+=(--hostfile "$hostfile")
  export MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")}
else
  # One node: keep MPI's out-of-band channel, its byte transfer (shared memory) and Gloo on loopback.
  args+=(--mca oob_tcp_if_include lo --mca btl self,vader)
  export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
fi
export MASTER_PORT=${MASTER_PORT:-29500}
if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
"$py" -c 'import mpi4py' 2>/dev/null || echo "mpi.sh: warning: mpi4py missing in $py; ranks fall back to OMPI_COMM_WORLD_* env" >&2

# Open MPI copies only the variables named with -x to remote ranks: the rendezvous, the site
# config's NCCL/Gloo settings, and whatever the Python needs.
for v in MASTER_ADDR MASTER_PORT PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV DS_ACCELERATOR OMP_NUM_THREADS \
         $(compgen -e | grep -E '^(NCCL_|GLOO_|TORCH_|CUDA_|SGTM_|HF_)' || true); do
  [ -n "${!v+x}" ] && args+=(-x "$v")
done
# shellcheck disable=SC2086
exec "$mpirun" "${args[@]}" ${MPIRUN_ARGS:-} "$py" -m pipeline train --config "$config" "$@"
