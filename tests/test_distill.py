"""Distillation fine-tuning, and the study's validation split."""

import json

import pytest
import torch
import torch.nn.functional as F

import svdcompress as sc
from svdcompress.cli import main
from svdcompress.core.distill import Distill, embedding_loss, logit_loss
from svdcompress.study.data import Dataset, split_validation
from svdcompress.study.models import MLP
from svdcompress.study.train import TrainConfig, train
from tests.test_data import make_mnist_dir


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_logit_loss_is_temperature_scaled_kl_mixed_with_labels():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0])
    cfg = Distill(temperature=2.0, alpha=0.7)
    p = F.softmax(t / 2, -1)
    kl = (p * (p.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    expect = 0.7 * kl + 0.3 * F.cross_entropy(s, y)
    torch.testing.assert_close(logit_loss(s, t, y, cfg), expect)
    assert float(logit_loss(t, t, None, Distill(alpha=1.0))) == pytest.approx(0.0, abs=1e-6)
    e = torch.randn(3, 8, generator=g)
    assert float(embedding_loss(e, 2 * e, Distill())) == pytest.approx(0.0, abs=1e-6)
    for bad in (dict(temperature=0), dict(alpha=1.5), dict(embedding_loss="l1")):
        with pytest.raises(ValueError):
            Distill(**bad)


@pytest.mark.parametrize("kw,field", [(dict(seed=2 ** 32), "seed"), (dict(seed=True), "seed"),
                                      (dict(epochs=-1), "epochs"), (dict(lr=0), "lr"),
                                      (dict(lr=True), "lr"), (dict(batch_size=0), "batch_size")])
def test_training_settings_of_the_study_and_of_encoder_distillation_are_checked_alike(kw, field):
    from svdcompress.integrations.distill import EncoderTrainConfig
    for cls in (TrainConfig, EncoderTrainConfig):
        with pytest.raises(sc.ConfigError, match=field):
            cls(**kw)


def test_distillation_lowers_the_distance_to_the_teacher():
    torch.manual_seed(0)
    teacher = MLP(16, [32, 32], 5)
    with torch.no_grad():  # confident outputs, as a trained network's
        for p in teacher.parameters():
            p.mul_(3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    data = Dataset("toy", x[:384], y[:384], x[384:], y[384:], 0.0, 1.0)
    student = MLP(16, [32, 32], 5)
    student.load_state_dict(teacher.state_dict())
    sc.compress_(student, sc.SVDConfig(rank=2))

    def distance():
        with torch.no_grad():
            return float(logit_loss(student(data.x_test), teacher(data.x_test), None, Distill(alpha=1.0)))

    before = distance()
    history = train(student, data, TrainConfig(epochs=4, lr=3e-3, batch_size=64, device="cpu"),
                    progress=False, teacher=teacher, distill=Distill(alpha=1.0))
    assert len(history) == 4 and distance() < 0.85 * before
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_the_validation_split_never_overlaps_test_or_training_data():
    n = 200
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)  # each sample is its own id
    y = torch.arange(n) % 10
    xt = 1000 + torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 3)
    data = Dataset("ids", x, y, xt, torch.arange(50) % 10, 0.0, 1.0)
    fit, val = split_validation(data, 0.1, seed=3)
    train_ids = set(fit.x_train[:, 0].tolist())
    val_ids = set(val.x_test[:, 0].tolist())
    test_ids = set(fit.x_test[:, 0].tolist())
    assert len(val_ids) == 20 and len(train_ids) == 180
    assert not train_ids & val_ids and not val_ids & test_ids and not train_ids & test_ids
    assert train_ids | val_ids == set(range(n)) and torch.equal(fit.x_test, xt)
    assert torch.equal(val.x_train, fit.x_train)  # the validation runs train on the same rest
    assert set(split_validation(data, 0.1, seed=4)[1].x_test[:, 0].tolist()) != val_ids
    with pytest.raises(ValueError, match="hold out"):
        split_validation(data, 0.001)


def test_cli_finetune_distill_from_the_source_run_and_resume(tmp_path, capsys):
    data = str(make_mnist_dir(tmp_path / "data", n_train=300, n_test=100))
    tiny = ["--width", "32", "--depth", "2", "--quiet", "--batch-size", "32", "--device", "cpu"]
    base, d2, ft = tmp_path / "base", tmp_path / "d2", tmp_path / "d2-kd"
    assert cli(capsys, "train", "--data", data, "--epochs", 2, "--out", base, *tiny)[0] == 0
    assert cli(capsys, "compress", base, "--rank", 2, "--out", d2)[0] == 0
    code, out, err = cli(capsys, "finetune", d2, "--out", ft, "--distill", "--epochs", 2,
                         "--lr", "3e-3", "--quiet", "--batch-size", "32", "--device", "cpu")
    assert code == 0, err
    meta = json.loads((ft / "svdcompress.json").read_text())
    assert meta["distill"]["teacher"] == str(base.resolve()) and meta["distill"]["temperature"] == 2.0
    assert len(meta["history"]) == 2 and meta["config"]["rank"] == 2
    # more epochs from its checkpoint: the teacher and settings must be the same
    code, out, err = cli(capsys, "finetune", d2, "--out", ft, "--distill", "--epochs", 3, "--resume",
                         "--lr", "3e-3", "--quiet", "--batch-size", "32", "--device", "cpu")
    assert code == 0, err
    assert len(json.loads((ft / "svdcompress.json").read_text())["history"]) == 3
    code, out, err = cli(capsys, "finetune", d2, "--out", tmp_path / "x", "--distill", "--teacher",
                         tmp_path / "missing", "--quiet")
    assert code == 2 and "missing" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli(capsys, "finetune", d2, "--out", tmp_path / "y", "--distill", "--alpha", "2", "--quiet")
    assert code == 2 and "alpha" in err
