"""Scale-out with torchrun: 2 CPU processes (gloo) against one, and a rank that dies."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import svdcompress as sc
from svdcompress.study.train import CHECKPOINT, read_checkpoint
from tests.test_data import make_mnist_dir

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
WORKER = str(Path(__file__).with_name("dist_worker.py"))
TINY = ["--width", "24", "--depth", "2", "--quiet", "--batch-size", "32", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SVDCOMPRESS_DIST_TIMEOUT": "30"}


def run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV,
                          timeout=240, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_mnist_dir(tmp_path_factory.mktemp("d") / "data", n_train=200, n_test=50)


def weights(run_dir):
    return load_file(Path(run_dir) / "model.safetensors")


@pytest.mark.slow
def test_two_processes_train_and_fine_tune_like_one(tmp_path, data_dir):
    for launcher, name in (([sys.executable, "-m", "svdcompress"], "one"), (TORCHRUN + ["-m", "svdcompress"], "two")):
        run([*launcher, "train", "--data", data_dir, "--epochs", 2, "--out", tmp_path / name, *TINY])
        run([*launcher, "train", "--init", tmp_path / name, "--project-rank", 4, "--epochs", 1,
             "--out", tmp_path / f"{name}-dyn", *TINY])
    for a, b in (("one", "two"), ("one-dyn", "two-dyn")):
        wa, wb = weights(tmp_path / a), weights(tmp_path / b)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4, msg=f"{a} {k}")
    history = sc.read_info(tmp_path / "two").history
    assert len(history) == 2 and history[-1]["train_accuracy"] == sc.read_info(tmp_path / "one").history[-1]["train_accuracy"]
    assert not (tmp_path / "two.partial").exists() and (tmp_path / "two" / CHECKPOINT).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("job", ["dynamic", "calibration", "blockwise"])
def test_every_rank_computes_the_same_result_as_one_process(tmp_path, job):
    if job == "blockwise":
        pytest.importorskip("transformers")
    run([*TORCHRUN, WORKER, job, tmp_path / "two"])
    run([sys.executable, WORKER, job, tmp_path / "one"])
    r0, r1 = (load_file(tmp_path / f"two-rank{r}.safetensors") for r in (0, 1))
    one = load_file(tmp_path / "one-rank0.safetensors")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # the ranks agree bit for bit
        if job != "dynamic":  # summed statistics: the same factors as one process to float32's
            # round-off (each process gathers its own batches' rows into float32 products)
            err = float((r0[k] - one[k]).norm() / one[k].norm().clamp_min(1e-12))
            assert err < 2e-5, (k, err)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job_with_a_message_and_the_checkpoint_stays(tmp_path, data_dir):
    out = tmp_path / "run"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "svdcompress", "train", "--data", str(data_dir), "--epochs", "500",
             "--out", str(out), *TINY], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ckpt = tmp_path / "run.partial" / CHECKPOINT
    deadline = time.time() + 120
    while not ckpt.is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.is_file()
    procs[1].send_signal(signal.SIGKILL)
    _, err = procs[0].communicate(timeout=90)
    assert procs[0].returncode == 2, err
    assert err.strip().count("\n") == 0 and "another process of the job failed" in err
    info, _ = read_checkpoint(ckpt)  # the last checkpoint is whole
    assert info["epoch"] >= 1 and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["plain", "whiten"])
def test_torchrun_compress_hf_writes_one_run_from_rank_0_like_one_process(tmp_path, method):
    """Both ranks used to write the run; the second failed on the existing directory."""
    pytest.importorskip("transformers")
    from tests.test_hf_guarantees import TEXTS, lm_dir
    src = lm_dir(tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(TEXTS[:200]))
    args = ["compress", "--hf", src, "--ratio", "0.5", "--method", method, "--calib", text,
            "--seq-len", "16", "--calib-seqs", "16"]
    proc = run([*TORCHRUN, "-m", "svdcompress", *args, "--out", tmp_path / "two"])
    assert "Traceback" not in proc.stderr
    run([sys.executable, "-m", "svdcompress", *args, "--out", tmp_path / "one"])
    sc.load(tmp_path / "two")  # complete, every hash right
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "src", "text.txt", "two"]
