import json
import subprocess
import sys

import svdcompress as sc
from svdcompress.study import MLP
from svdcompress.cli import main


def run(*argv, capsys):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert sc.__version__ in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "svdcompress.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "info" in proc.stdout


def test_info_on_a_saved_run(tmp_path, capsys):
    mlp = MLP(20, [16, 16], 3)
    sc.compress_(mlp, sc.SVDConfig(rank=4))
    sc.save(mlp, tmp_path)
    code, out, _ = run("info", str(tmp_path), capsys=capsys)
    assert code == 0 and "hidden.0" in out and "rank 4" in out


def test_errors_are_one_line_and_status_2(tmp_path, capsys):
    code, out, err = run("info", str(tmp_path / "missing"), capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "not found" in err
    code, _, err = run("--bogus", capsys=capsys)
    assert code == 2 and err.count("\n") == 1


def test_tampered_run_no_traceback(tmp_path):
    mlp = MLP(20, [16, 16], 3)
    sc.compress_(mlp, sc.SVDConfig(rank=4))
    sc.save(mlp, tmp_path)
    meta = json.loads((tmp_path / "svdcompress.json").read_text())
    meta["layers"][0]["rank"] = 5
    (tmp_path / "svdcompress.json").write_text(json.dumps(meta))
    proc = subprocess.run([sys.executable, "-m", "svdcompress.cli", "info", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1 and "shape" in proc.stderr
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    proc = subprocess.run([sys.executable, "-m", "svdcompress.cli", "info", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_a_reader_that_goes_away_is_not_an_error(tmp_path):
    # `svdcompress info RUN | head`: the pipe closes before everything is written
    sc.save(MLP(20, [16] * 40, 3), tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-m", "svdcompress", "info", str(tmp_path / "run")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before the command writes anything
    err = p.stderr.read().decode()
    assert p.wait() == 0 and err == "", err
