import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import svdcompress as sc
from svdcompress.study import MLP
from svdcompress import FormatError, read_meta
from svdcompress.core.files import sha256_file
from tests.conftest import ToyNet


def compressed_toy(path, rank=2):
    torch.manual_seed(0)
    model = ToyNet()
    cfg = sc.SVDConfig(rank=rank)
    sc.compress_(model, cfg)
    sc.save(model, path, config=cfg, info=sc.RunInfo(metrics={"accuracy": 0.5}))
    return model


def test_round_trip_identical_outputs_and_keys(tmp_path, toy_input):
    model = compressed_toy(tmp_path / "run")
    torch.manual_seed(123)  # a differently initialised base
    loaded = sc.load(tmp_path / "run", model=ToyNet())
    assert list(loaded.state_dict()) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded(toy_input), model(toy_input))
    meta = read_meta(tmp_path / "run")
    assert meta["config"]["rank"] == 2 and meta["metrics"] == {"accuracy": 0.5}
    assert {e["name"]: e["kind"] for e in meta["layers"]} == {
        "block.conv": "conv2d", "block.proj": "linear", "mlp.0": "linear", "mlp.1": "linear"}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.safetensors", "svdcompress.json"]


def test_builtin_model_loads_without_code(tmp_path):
    mlp = MLP(20, [16, 16], 3)
    sc.compress_(mlp, sc.SVDConfig(rank=4))
    sc.save(mlp, tmp_path)
    loaded = sc.load(tmp_path)
    x = torch.randn(5, 20)
    assert isinstance(loaded.hidden[1], sc.LowRankLinear)
    assert torch.equal(loaded(x), mlp(x))


def test_tied_weights_saved_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

    m = Tied()
    sc.save(m, tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == {"a.weight", "a.bias", "b.bias"}
    loaded = sc.load(tmp_path, model=Tied())
    assert torch.equal(loaded.b.weight, m.a.weight)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FormatError, match="not found"):
        sc.load(tmp_path / "nope", model=ToyNet())
    compressed_toy(tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").unlink()
    with pytest.raises(FormatError, match="model.safetensors. not found: the run .* is incomplete"):
        sc.load(tmp_path / "run", model=ToyNet())


def edit_meta(path, fn):
    p = path / "svdcompress.json"
    meta = json.loads(p.read_text())
    fn(meta)
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(format_version=99), "unsupported format_version 99"),
    (lambda m: m.pop("format"), "not written by svdcompress"),
    (lambda m: m.update(layers="x"), "'layers' must be a list"),
    (lambda m: m["layers"][0].update(rank=3), "has shape"),
    (lambda m: m["layers"][0].update(kind="weird"), "unknown kind"),
    (lambda m: m["layers"][0].update(name="nowhere"), "not in the model"),
    (lambda m: m["layers"][1].update(in_features=7), "saved as"),
    (lambda m: m["layers"][1].pop("rank"), "'rank' is missing"),
])
def test_tampered_json_gives_clear_error(tmp_path, edit, message):
    compressed_toy(tmp_path)
    edit_meta(tmp_path, edit)
    with pytest.raises(FormatError, match=message):
        sc.load(tmp_path, model=ToyNet())


def test_json_that_is_not_json(tmp_path):
    compressed_toy(tmp_path)
    (tmp_path / "svdcompress.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        sc.load(tmp_path, model=ToyNet())


def rehash(run):
    """Record the current files' hashes, as a run written wrongly but consistently would."""
    edit_meta(run, lambda m: m.update(files={
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in run.iterdir() if p.name != "svdcompress.json"}))


def test_tampered_safetensors(tmp_path):
    compressed_toy(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["extra"] = torch.zeros(1)
    save_file(tensors, path)
    with pytest.raises(FormatError, match="model.safetensors does not match the hash"):
        sc.load(tmp_path, model=ToyNet())
    rehash(tmp_path)
    with pytest.raises(FormatError, match="unexpected tensor"):
        sc.load(tmp_path, model=ToyNet())
    del tensors["extra"], tensors["mlp.0.u"]
    save_file(tensors, path)
    rehash(tmp_path)
    with pytest.raises(FormatError, match="lacks 1 tensor"):
        sc.load(tmp_path, model=ToyNet())
    path.write_bytes(b"garbage" * 10)
    rehash(tmp_path)
    with pytest.raises(FormatError, match="cannot read"):
        sc.load(tmp_path, model=ToyNet())


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    model = compressed_toy(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("svdcompress.core.io.save_file", broken)
    with pytest.raises(OSError):
        sc.save(model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "svdcompress.json"]


def test_a_low_rank_layer_used_under_two_names_is_saved_once_and_reloads_tied(tmp_path):
    # u is a transposed view: the state dict must still hold u itself, or the tie is lost
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(12, 20)
            self.b = self.a

    torch.manual_seed(0)
    m = Shared()
    sc.compress_(m, sc.SVDConfig(rank=3, skip_output_layer=False))
    sc.save(m, tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == {"a.u", "a.v", "a.bias"}
    loaded = sc.load(tmp_path, model=Shared())
    assert loaded.b is loaded.a and torch.equal(loaded.a.u, m.a.u)
