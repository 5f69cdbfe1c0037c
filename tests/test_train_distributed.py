"""Data-parallel training over torch.distributed (gloo, CPU): the partition, exact agreement of
a 2-process run with a 1-process run on ML-100K, a killed rank, and resuming after it.

The 2-process runs are real separate processes on 127.0.0.1: torchrun running this file as its
worker script (``python -m torch.distributed.run ... tests/test_train_distributed.py worker``),
and the ``train`` command under torchrun or launched rank by rank with torchrun's variables.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recsys_flowadam.train.distributed import init_from_env, partition_indices

REPO = Path(__file__).resolve().parents[1]
COMMON = {"model": "biased-mf", "rank": 8, "reg": 1e-4, "seed": 3, "device": "cpu", "patience": 0,
          "eval_every": 1000}
# name -> TrainConfig fields; full batch on both full-batch paths, and mini-batch
CASES = {
    "adam-sparse": {"optimizer": "adam", "lr": 0.02, "steps": 30, "representation": "sparse"},
    # float64: in float32, rounding alone (this very run on the dense vs the sparse path, in ONE
    # process) drifts 1e-4 relative over these 30 FlowAdam steps (ODE solves amplify it), so a
    # float32 comparison would measure rounding, not the distributed algorithm (float64: 1e-13)
    "flowadam-dense": {"optimizer": "flowadam", "lr": 0.02, "steps": 30, "representation": "dense",
                       "dtype": "float64", "optimizer_kwargs": {"mode": "B"}},  # B: its ODE solves fire here
    "minibatch-adam": {"optimizer": "adam", "lr": 0.01, "batch_size": 2048, "epochs": 4},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # gloo on loopback whatever the host name resolves to
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo", **extra)
    return env


def _run_torchrun(cmd: list[str], timeout: float) -> tuple[int, str, str]:
    """Run a torchrun command line in its own process group, so that a timeout kills the worker
    ranks too (killing torchrun alone would leave them running)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return proc.returncode, stdout, stderr


def _split(data_dir: str):
    """ML-100K fold u1 (its validation part drawn with seed 0, as ``train --seed 0`` does)."""
    from recsys_flowadam.train.pipeline import DataSettings, load_split

    return load_split(DataSettings("ml-100k", "u1", data_dir, offline=True), 0)[1]


def _run_case(name: str, split):
    """Train one case (in whatever process group is current); ``(result, test_rmse)``."""
    from recsys_flowadam.train import TrainConfig, train_model
    from recsys_flowadam.train.pipeline import evaluate_ratings

    result = train_model(split.train, None, TrainConfig(**COMMON, **CASES[name]))
    test = evaluate_ratings(result.predictor, split.test, torch.device("cpu"), breakdown=False)
    return result, test["rmse"]


def _worker(out: str, data_dir: str) -> None:
    """Body of each torchrun rank: every case once; rank 0 saves what the tests compare."""
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    ctx = init_from_env("cpu", 60)
    assert ctx is not None and ctx.world_size == 2
    split = _split(data_dir)
    for name in CASES:
        result, rmse = _run_case(name, split)
        if ctx.is_main:
            save_file({k: v.contiguous() for k, v in result.params.items()}, f"{out}/{name}.safetensors")
            Path(f"{out}/{name}.json").write_text(json.dumps(
                {"test_rmse": rmse, "grad_evals": result.grad_evals, "diagnostics": result.diagnostics,
                 "world_size": result.extra.get("world_size")}))
    from recsys_flowadam.train.distributed import shutdown

    shutdown()


# ---------------------------------------------------------------- no data, no processes


def test_partition_is_seeded_balanced_and_disjoint():
    n, world = 1003, 4
    shards = [partition_indices(n, world, r, seed=5) for r in range(world)]
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.arange(n))
    assert all(torch.equal(s, torch.sort(s).values) for s in shards)
    assert torch.equal(shards[1], partition_indices(n, world, 1, seed=5))
    assert not torch.equal(shards[1], partition_indices(n, world, 1, seed=6))
    # a random split, not a contiguous or strided one
    assert not torch.equal(shards[0], torch.arange(0, n, world))
    with pytest.raises(ValueError, match="rank 4 outside"):
        partition_indices(n, world, 4, seed=5)


def test_init_from_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert init_from_env("cpu") is None  # a plain single-process run
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT not set"):
        init_from_env("cpu")


# ---------------------------------------------------------------- 2 processes vs 1 on ML-100K


@pytest.fixture(scope="module")
def two_process_run(real_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(Path(__file__).resolve()), "worker", str(out), str(real_data_dir)]
    returncode, _, stderr = _run_torchrun(cmd, timeout=300)
    assert returncode == 0, stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ml100k_split(real_data_dir):
    return _split(str(real_data_dir))


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.parametrize("name", ["adam-sparse", "flowadam-dense"])
def test_two_processes_match_one_full_batch(name, two_process_run, ml100k_split, one_thread):
    from safetensors.torch import load_file

    single, _ = _run_case(name, ml100k_split)
    dist_params = load_file(str(two_process_run / f"{name}.safetensors"))
    info = json.loads((two_process_run / f"{name}.json").read_text())
    assert info["world_size"] == 2
    for k, p in single.params.items():
        d = dist_params[k]
        assert d.shape == p.shape
        # relative error of the whole tensor (||d - p|| / ||p||): float32 sums in another order
        # differ in the last bits, which Adam's normalisation can amplify for single entries
        # with tiny gradients (a user with few ratings), so no per-element rtol
        rel = float((d - p).norm() / p.norm())
        assert rel <= 1e-5, (k, rel)
    # same closure calls: FlowAdam's trigger decisions (ODE solves) agreed step for step
    assert info["grad_evals"] == single.grad_evals
    if name.startswith("flowadam"):
        assert info["diagnostics"]["ode_triggers"] == single.diagnostics["ode_triggers"]
        assert single.diagnostics["ode_triggers"] > 0, "the case should exercise FlowAdam's ODE branch"


@pytest.mark.real_data
@pytest.mark.slow
def test_two_processes_minibatch_same_test_rmse(two_process_run, ml100k_split, one_thread):
    single, rmse_1 = _run_case("minibatch-adam", ml100k_split)
    info = json.loads((two_process_run / "minibatch-adam.json").read_text())
    assert info["grad_evals"] == single.grad_evals  # same number of steps per epoch
    assert abs(info["test_rmse"] - rmse_1) / rmse_1 <= 0.005, (info["test_rmse"], rmse_1)


# ---------------------------------------------------------------- a killed or hung rank, then --resume


def _cli_args(data_dir, out: Path) -> list[str]:
    return ["train", "--dataset", "ml-100k", "--data-dir", str(data_dir), "--offline", "--split", "u1",
            "--model", "biased-mf", "--optimizer", "adam", "--rank", "8", "--lr", "0.02", "--reg", "0.0001",
            "--seed", "0", "--device", "cpu", "--eval-every", "100000", "--patience", "0", "--threads", "1",
            "--checkpoint-every", "5", "--no-refit", "--out", str(out), "--json"]


def _fail_one_rank(args: list[str], ckpt: Path, sig: int, timeout_s: int) -> tuple[int, str, float]:
    """Start 2 ranks of an endless run by hand (torchrun's variables, one process each, so one
    can be hit), send ``sig`` to rank 1 once a checkpoint exists; rank 0's (rc, stderr, seconds)."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "recsys_flowadam", *args, "--steps", "1000000",
                                       "--dist-timeout", str(timeout_s)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.05)
        procs[1].send_signal(sig)
        t_hit = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 60)
        return procs[0].returncode, err, time.monotonic() - t_hit
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.real_data
@pytest.mark.slow
def test_hung_rank_times_out_with_clear_error(real_data_dir, tmp_path):
    out = tmp_path / "art"
    rc, err, waited = _fail_one_rank(_cli_args(real_data_dir, out), out / "checkpoint.safetensors",
                                     signal.SIGSTOP, timeout_s=10)
    assert rc == 2, err[-2000:]
    # the collective timeout, not a hang (10 s: a loaded CI box must still get both ranks started)
    assert 9 <= waited < 60, waited
    assert "another rank died, hung or became unreachable (collective timeout 10 s" in err, err[-2000:]
    assert "Traceback" not in err


@pytest.mark.real_data
@pytest.mark.slow
def test_killed_rank_gives_clear_error_then_resume(real_data_dir, tmp_path, ml100k_split, one_thread):
    out = tmp_path / "art"
    ckpt = out / "checkpoint.safetensors"
    args = _cli_args(real_data_dir, out)
    rc, err, waited = _fail_one_rank(args, ckpt, signal.SIGKILL, timeout_s=20)
    assert rc == 2, err[-2000:]
    assert waited < 40
    assert "another rank died, hung or became unreachable" in err and "rerun with --resume" in err, err[-2000:]
    assert "Traceback" not in err

    # resume from the last checkpoint with torchrun, a few steps further
    from recsys_flowadam.train.checkpoint import load_checkpoint

    ck_step = load_checkpoint(ckpt)[1]["loop"]["step"]
    assert ck_step >= 5 and ck_step % 5 == 0
    total = ck_step + 7
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "recsys_flowadam", *args, "--steps", str(total), "--resume"]
    returncode, stdout, stderr = _run_torchrun(cmd, timeout=180)
    assert returncode == 0, stderr[-3000:]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 1 stays silent
    summary = json.loads(lines[0])
    assert summary["resumed_from"] == ck_step and summary["steps"] == total and summary["world_size"] == 2

    # ... and ends where an uninterrupted single-process run of `total` steps ends
    from safetensors.torch import load_file

    from recsys_flowadam.train import TrainConfig, train_model

    config = TrainConfig(model="biased-mf", optimizer="adam", rank=8, lr=0.02, reg=1e-4, seed=0, device="cpu",
                         eval_every=100000, patience=0, steps=total)
    single = train_model(ml100k_split.train, ml100k_split.val, config)
    resumed = load_file(str(out / "model.safetensors"))
    for k, p in single.params.items():
        assert float((resumed[k] - p).norm() / p.norm()) <= 1e-5, (k, total)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3])
