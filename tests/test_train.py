import pytest
import torch

import svdcompress as sc
from svdcompress.study import MLP
from svdcompress.study.data import load_dataset
from svdcompress import FormatError
from svdcompress.study.train import CHECKPOINT, TrainConfig, evaluate, train
from tests.test_data import make_mnist_dir


@pytest.fixture
def tiny(tmp_path):
    return load_dataset(str(make_mnist_dir(tmp_path / "data")))


def fresh(seed=0):
    torch.manual_seed(seed)
    return MLP(64, [32, 32], 10)


def test_training_learns_and_is_deterministic(tiny):
    cfg = TrainConfig(epochs=3, lr=3e-3, batch_size=32, device="cpu")
    a, b = fresh(), fresh()
    ha = train(a, tiny, cfg, progress=False)
    hb = train(b, tiny, cfg, progress=False)
    assert ha[-1]["test_accuracy"] > 0.5
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_resume_ends_with_same_weights(tiny, tmp_path):
    full_cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=32, device="cpu")
    straight = fresh()
    train(straight, tiny, full_cfg, progress=False)

    interrupted = fresh()
    train(interrupted, tiny, TrainConfig(epochs=2, lr=3e-3, batch_size=32, device="cpu"),
          checkpoint_dir=tmp_path / "ck", progress=False)
    resumed = fresh(seed=99)  # a different init: everything must come from the checkpoint
    history = train(resumed, tiny, full_cfg, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_cosine_schedule_anneals_to_zero_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    from svdcompress.core.checkpoint import set_lr
    from svdcompress.study import train as train_module
    cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=32, device="cpu", schedule="cosine")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert set_lr(opt, cfg, 0, 0, 10) == pytest.approx(3e-3)
    assert set_lr(opt, cfg, 2, 0, 10) == pytest.approx(1.5e-3) == opt.param_groups[0]["lr"]
    assert 0 < set_lr(opt, cfg, 3, 9, 10) < 3e-3 * 1e-2
    constant = TrainConfig(epochs=4, lr=3e-3, batch_size=32, device="cpu")
    assert set_lr(opt, constant, 3, 9, 10) == 3e-3
    with pytest.raises(ValueError, match="schedule must be one of constant, cosine"):
        TrainConfig(schedule="linear")

    straight = fresh()
    train(straight, tiny, cfg, progress=False)
    const = fresh()
    train(const, tiny, constant, progress=False)
    assert any(not torch.equal(v, straight.state_dict()[k]) for k, v in const.state_dict().items())
    real_save, saves = train_module.save_checkpoint, []

    def killed_after_two(*args, **kw):
        real_save(*args, **kw)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "save_checkpoint", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), tiny, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    # the schedule depends on the number of epochs: another --epochs is refused
    with pytest.raises(ValueError, match="schedule depends on the number of epochs"):
        train(fresh(), tiny, TrainConfig(epochs=6, lr=3e-3, batch_size=32, device="cpu", schedule="cosine"),
              checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    with pytest.raises(ValueError, match="schedule=cosine"):
        train(fresh(), tiny, constant, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    resumed = fresh(seed=99)
    history = train(resumed, tiny, cfg, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_with_other_settings_or_corrupt_checkpoint(tiny, tmp_path):
    cfg = TrainConfig(epochs=1, lr=3e-3, batch_size=32, device="cpu")
    train(fresh(), tiny, cfg, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr=0.003"):
        train(fresh(), tiny, TrainConfig(epochs=2, lr=1e-3, batch_size=32, device="cpu"),
              checkpoint_dir=tmp_path, resume=True, progress=False)
    (tmp_path / CHECKPOINT).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(FormatError, match="corrupt checkpoint"):
        train(fresh(), tiny, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_evaluate_restores_mode(tiny):
    m = fresh().train()
    r = evaluate(m, tiny.x_test, tiny.y_test)
    assert m.training
    with torch.no_grad():
        out = m.eval()(tiny.x_test)
    assert r["accuracy"] == pytest.approx(float((out.argmax(1) == tiny.y_test).float().mean()))
    assert r["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out, tiny.y_test)), rel=1e-5)


@pytest.mark.parametrize("kw,field", [({"epochs": -1}, "epochs"), ({"lr": 0}, "lr"),
                                      ({"batch_size": 0}, "batch_size"), ({"device": "tpu"}, "device")])
def test_train_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kw)
