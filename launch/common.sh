# shellcheck shell=bash
# Helpers shared by the launchers (sourced, not run).

# The repository root: from the launcher's own path, or (inside a SLURM batch job, whose script is a
# copy in slurmd's spool directory) SGTM_ROOT / the directory sbatch was called from.
sgtm_root() {
  if [ -n "${SGTM_ROOT:-}" ]; then echo "$SGTM_ROOT"; return; fi
  if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/launch/common.sh" ]; then echo "$SLURM_SUBMIT_DIR"; return; fi
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}

# Source the site config (NCCL/IB env): SGTM_SITE_ENV or launch/site_env.sh.
sgtm_site_env() {
  local f=${SGTM_SITE_ENV:-$(sgtm_root)/launch/site_env.sh}
  # shellcheck disable=SC1090
  [ -f "$f" ] && source "$f"
  return 0
}

# The Python that runs the pipeline: $PYTHON, else the repo's .venv, else python3 on PATH.
sgtm_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local venv
  venv=$(sgtm_root)/.venv/bin/python
  if [ -x "$venv" ]; then echo "$venv"; else command -v python3; fi
}

# run_dir of CONFIG + overrides (validates the config before any node time is spent).
sgtm_run_dir() {
  "$(sgtm_python)" - "$@" <<'PY'
import sys
from pipeline.config import load_config
print(load_config(sys.argv[1], [a for a in sys.argv[2:] if "=" in a and not a.startswith("-")]).run_dir)
PY
}

# Processes per node when not given: the GPUs we can see, else 1.
sgtm_default_nproc() {
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  [ "$n" -gt 0 ] && echo "$n" || echo 1
}
