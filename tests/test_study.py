"""The study's CLI end to end on a tiny generated dataset (2 hidden layers of 32)."""

import json

import pytest
import torch

from svdcompress.cli import main
from tests.test_data import make_mnist_dir


@pytest.fixture
def data_dir(tmp_path):
    return str(make_mnist_dir(tmp_path / "data", n_train=400, n_test=100))


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


TINY = ["--width", "32", "--depth", "2", "--quiet", "--batch-size", "32", "--device", "cpu"]


def test_train_sweep_compress_finetune_eval(tmp_path, data_dir, capsys):
    base, d4, ft = tmp_path / "base", tmp_path / "d4", tmp_path / "d4-ft"
    code, out, err = cli(capsys, "train", "--data", data_dir, "--epochs", 3, "--lr", "3e-3",
                         "--out", base, *TINY)
    assert code == 0, err
    assert {p.name for p in base.iterdir()} >= {"model.safetensors", "svdcompress.json", "checkpoint.safetensors"}

    code, out, err = cli(capsys, "sweep", base, "--ranks", "2,4,full")
    assert code == 0, err
    rows = json.loads((base / "results.json").read_text())["sweep"]
    assert [r["rank"] for r in rows] == [2, 4, "full"]
    assert rows[0]["params"] < rows[1]["params"] < rows[2]["params"]
    assert all({"accuracy", "params", "bytes", "compression"} <= set(r) for r in rows)

    code, out, err = cli(capsys, "compress", base, "--rank", 4, "--out", d4)
    assert code == 0, err and "output layer" in out
    code, out, err = cli(capsys, "eval", d4)
    assert code == 0 and f"{rows[1]['accuracy']:.4f}" in out  # same number as the sweep's D=4

    code, out, err = cli(capsys, "finetune", d4, "--epochs", 2, "--out", ft, "--quiet", "--device", "cpu")
    assert code == 0, err
    meta = json.loads((ft / "svdcompress.json").read_text())
    assert meta["config"]["rank"] == 4 and len(meta["history"]) == 2
    assert [e["rank"] for e in meta["layers"]] == [4, 4]

    code, out, err = cli(capsys, "compress", base, "--energy", "0.9", "--out", tmp_path / "e90")
    assert code == 0, err


def test_reproduce_writes_every_output(tmp_path, data_dir, capsys):
    out_dir = tmp_path / "report"
    code, out, err = cli(capsys, "reproduce", "--data", data_dir, "--out", out_dir, "--epochs", 2,
                         "--ranks", "2,4,8,full", "--ft-rank", 4, "--ft-epochs", 1, *TINY[:4], "--quiet")
    assert code == 0, err
    for name in ("report.md", "results.json", "accuracy_vs_rank.png", "accuracy_vs_params.png",
                 "spectra.png", "training_curves.png"):
        assert (out_dir / name).stat().st_size > 0, name
    results = json.loads((out_dir / "results.json").read_text())
    report = (out_dir / "report.md").read_text()
    for row in results["sweep"]:  # the report's numbers are this run's numbers
        assert f"{100 * row['accuracy']:.2f}%" in report
    assert len(results["claims"]) >= 5
    for c in results["claims"]:  # every claim is in the report with its own verdict
        assert c["verdict"] in ("supported", "not supported", "inconclusive")
        shown = c["verdict"] if c["verdict"] == "supported" else f"**{c['verdict']}**"
        assert f"| {c['claim']} | {shown} |" in report
    assert [r["method"] for r in results["sweep_whiten"]] == ["whiten"] * 4
    assert {(r["rank"], r["allocation"]) for r in results["allocation"]} == {
        (4, "uniform"), (4, "truncation-loss"), (4, "loss-aware")}
    assert "Whitened (data-aware) truncation" in report and "| 4 | loss-aware (chosen:" in report
    # each method's learning rate was chosen on the validation split, never on the test split
    lr = results["learning_rates"]
    assert set(lr["chosen"]) == {"finetune", "distill", "dynamic"}
    for name, rate in lr["chosen"].items():
        assert rate in results["settings"]["lr_grid"] and results[name]["lr"] == rate
        assert all(r["lr"] == rate for r in results[name]["runs"])
    assert results["data"]["validation_samples"] + results["data"]["train_samples"] == 400
    assert len(results["finetune"]["runs"]) == len(results["dynamic"]["runs"]) == 3
    assert "## Recovering accuracy" in report and "Distillation from the dense network" in report
    assert (out_dir / "runs" / "base" / "svdcompress.json").is_file()
    # the whitened-vs-plain claim shows the paired difference on the same test samples
    assert results["settings"]["schedule"] == "cosine"
    # distillation and its labels-only twin start from the same whitened, loss-aware factors
    dis = results["distill"]
    la = next(r for r in results["allocation"] if r["allocation"] == "loss-aware" and r["rank"] == 4)
    assert dis["runs"][0]["start_accuracy"] == dis["finetune_same_start"]["start_accuracy"] == la["accuracy"]
    assert "fine-tune (labels), whitened, loss-aware ranks start" in report
    pairs = results["sweep_paired"]
    assert set(pairs) == {"2", "4", "8", "full"} and pairs["full"]["difference"] == 0
    for r_p, r_w in zip(results["sweep"][:3], results["sweep_whiten"][:3]):
        p = pairs[str(r_p["rank"])]
        assert p["difference"] == pytest.approx(r_w["accuracy"] - r_p["accuracy"])
    claim = next(c for c in results["claims"] if c["claim"].startswith("Whitened (data-aware)"))
    assert "points, 1 s.e.)" in claim["evidence"]


def test_paired_difference_and_its_standard_error():
    from svdcompress.study.experiments import paired
    a = torch.tensor([True] * 60 + [False] * 40)
    b = torch.tensor([True] * 50 + [False] * 10 + [True] * 5 + [False] * 35)
    p = paired({10: a}, {10: b})["10"]
    assert (p["only_first"], p["only_second"]) == (10, 5)
    assert p["difference"] == pytest.approx(0.05)
    d = (a.double() - b.double())
    assert p["se"] == pytest.approx(float(d.std() / 100 ** 0.5))


@pytest.mark.parametrize("argv,message", [
    (["compress", "{base}", "--rank", "0", "--out", "{tmp}/x"], "positive integer"),
    (["compress", "{base}", "--rank", "5000", "--out", "{tmp}/x"], "above every target layer"),
    (["compress", "{tmp}/missing", "--rank", "4", "--out", "{tmp}/x"], "not found"),
    (["sweep", "{base}", "--ranks", "4,zero"], "positive integer"),
    (["eval", "{tmp}/missing"], "not found"),
    (["train", "--data", "{tmp}/nodata", "--out", "{tmp}/y", "--quiet"], "not found"),
    (["train", "--data", "{data}", "--out", "{base}", "--resume", "--epochs", "2", "--quiet",
      "--width", "32", "--depth", "2", "--batch-size", "32"], "checkpoint.safetensors does not match the hash"),
    (["train", "--data", "{data}", "--out", "{tmp}/x", "--schedule", "linear", "--quiet"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, data_dir, capsys, argv, message):
    base = tmp_path / "base"
    assert cli(capsys, "train", "--data", data_dir, "--epochs", 1, "--out", base, *TINY)[0] == 0
    if "--resume" in argv:
        (base / "checkpoint.safetensors").write_bytes(b"garbage")
    argv = [a.format(base=base, tmp=tmp_path, data=data_dir) for a in argv]
    code, out, err = cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()


def test_cosine_schedule_from_the_cli_resumes_only_with_its_epochs(tmp_path, data_dir, capsys):
    base = tmp_path / "base"
    code, out, err = cli(capsys, "train", "--data", data_dir, "--epochs", 2, "--schedule", "cosine",
                         "--out", base, *TINY)
    assert code == 0, err
    code, out, err = cli(capsys, "train", "--data", data_dir, "--epochs", 3, "--schedule", "cosine",
                         "--resume", "--out", base, *TINY)
    assert code == 2 and err.count("\n") == 1 and "same --epochs" in err, err
    code, out, err = cli(capsys, "train", "--data", data_dir, "--epochs", 3, "--resume", "--out", base, *TINY)
    assert code == 2 and "schedule=cosine" in err, err


def test_dynamic_training_from_a_run(tmp_path, data_dir, capsys):
    base, dyn = tmp_path / "base", tmp_path / "dyn4"
    assert cli(capsys, "train", "--data", data_dir, "--epochs", 2, "--lr", "3e-3", "--out", base, *TINY)[0] == 0
    code, out, err = cli(capsys, "train", "--init", base, "--project-rank", 4, "--lr", "1e-3",
                         "--epochs", 2, "--out", dyn, "--quiet", "--device", "cpu", "--batch-size", "32")
    assert code == 0, err
    meta = json.loads((dyn / "svdcompress.json").read_text())
    assert [(e["kind"], e["rank"]) for e in meta["layers"]] == [("linear", 4), ("linear", 4)]
    assert meta["projection"]["method"] == "subspace" and len(meta["history"]) == 2
    code, out, err = cli(capsys, "eval", dyn)
    assert code == 0 and f"{meta['metrics']['accuracy']:.4f}" in out
    # resuming the finished run from its checkpoint is a no-op that gives the same factors
    code, out, err = cli(capsys, "train", "--init", base, "--project-rank", 4, "--lr", "1e-3",
                         "--epochs", 2, "--out", dyn, "--quiet", "--resume", "--batch-size", "32")
    assert code == 0, err
    assert json.loads((dyn / "svdcompress.json").read_text())["metrics"] == meta["metrics"]


@pytest.mark.parametrize("argv,message", [
    (["train", "--out", "{tmp}/x", "--project-rank", "4"], "needs --init"),
    (["train", "--out", "{tmp}/x"], "--data"),
    (["train", "--init", "{base}", "--project-rank", "0", "--out", "{tmp}/x"], "positive integer"),
    (["train", "--init", "{base}", "--project-rank", "999", "--out", "{tmp}/x"], "above every target layer"),
])
def test_dynamic_bad_arguments(tmp_path, data_dir, capsys, argv, message):
    base = tmp_path / "base"
    assert cli(capsys, "train", "--data", data_dir, "--epochs", 1, "--out", base, *TINY)[0] == 0
    code, out, err = cli(capsys, *[a.format(base=base, tmp=tmp_path) for a in argv])
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()


def test_whitened_compress_and_side_by_side_sweep(tmp_path, data_dir, capsys):
    base = tmp_path / "base"
    assert cli(capsys, "train", "--data", data_dir, "--epochs", 2, "--lr", "3e-3", "--out", base, *TINY)[0] == 0
    code, out, err = cli(capsys, "sweep", base, "--ranks", "2,4,full", "--calib-batches", 2)
    assert code == 0, err
    assert "plain acc." in out and "whiten acc." in out
    saved = json.loads((base / "results.json").read_text())
    assert [r["method"] for r in saved["sweep_whiten"]] == ["whiten"] * 3
    code, out, err = cli(capsys, "compress", base, "--ratio", "0.3", "--allocation", "global",
                         "--method", "whiten", "--calibration", "sequential", "--calib-batches", 2, "--out", tmp_path / "g")
    assert code == 0, err
    meta = json.loads((tmp_path / "g" / "svdcompress.json").read_text())
    assert meta["config"]["allocation"] == "global" and meta["config"]["method"] == "whiten"
    kept = sum(e["rank"] * (e["in_features"] + e["out_features"]) for e in meta["layers"])
    assert kept <= 0.3 * (64 * 32 + 32 * 32)
    code, out, err = cli(capsys, "compress", base, "--rank", 2, "--allocation", "global", "--out", tmp_path / "h")
    assert code == 2 and "needs ratio" in err
