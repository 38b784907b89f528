# shellcheck shell=bash
# ======================= SITE CONFIG: the one place for cluster-specific env =======================
# Sourced by every launcher (local.sh, mpi.sh, slurm/train.sbatch, slurm/sweep.sbatch) on every
# node before training starts. Edit it for your cluster, or point SGTM_SITE_ENV at your own copy.
# Everything here is commented out: the defaults of NCCL and Gloo are right for one node.

# --- software environment -------------------------------------------------------------------
# module load cuda/12.8 nccl
# source /path/to/sgtm/.venv/bin/activate

# --- NCCL over InfiniBand / RoCE (multi-node GPU jobs) --------------------------------------
# export NCCL_IB_HCA=mlx5                # HCAs to use (ibv_devices lists them)
# export NCCL_IB_GID_INDEX=3             # RoCE v2 only
# export NCCL_SOCKET_IFNAME=ib0          # interface for NCCL's bootstrap (not lo, not docker0)
# export NCCL_NET_GDR_LEVEL=PHB          # GPUDirect RDMA distance
# export NCCL_CROSS_NIC=0
# export NCCL_DEBUG=WARN                 # INFO once, to check it picked IB ("NET/IB")
# export NCCL_ASYNC_ERROR_HANDLING=1     # a dead peer fails the job instead of hanging it
# export TORCH_NCCL_BLOCKING_WAIT=0

# --- the rendezvous / Gloo interface (MASTER_ADDR must be reachable from every node) -------
# export GLOO_SOCKET_IFNAME=ib0
# export SGTM_MASTER_PORT=29500          # default: derived from the SLURM job id

# --- CPU threads per rank ---------------------------------------------------------------------
# export OMP_NUM_THREADS=8
# ===================================================================================================
