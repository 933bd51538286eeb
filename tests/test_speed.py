"""Measured speed decides which layers to factorise (SVDConfig(speed_for=...), core/speed.py)."""

import pytest
import torch
from torch import nn

import svdcompress as sc
from svdcompress.cli import main
from svdcompress.core import speed


def test_a_layer_whose_factors_are_slower_stays_dense_with_the_measurement():
    # 64 x 64 at rank 31 saves a few parameters (31 * 128 < 64 * 64), but at one row two
    # matmuls cost about twice one: certainly slower than the dense layer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 2))
    report = sc.compress_(model, sc.SVDConfig(rank=31, speed_for="decode"))
    assert not report.compressed
    kept = [r for r in report.layers if r.name in ("0", "1")]
    assert all(r.reason is sc.KeepDense.NOT_FASTER and "measured" in r.detail for r in kept)
    assert type(model[0]) is nn.Linear
    assert speed.measured_speedup((64, 64), 31, 1) < 1


def test_a_layer_whose_factors_are_much_faster_is_factorised():
    # 1024 x 1024 at rank 8 on 512 rows: 64x fewer multiply-adds, certainly faster
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 2))
    report = sc.compress_(model, sc.SVDConfig(rank=8, speed_for="prefill"))
    assert [r.name for r in report.compressed] == ["0"] and model[0].rank == 8
    assert speed.measured_speedup((1024, 1024), 8, speed.PREFILL_ROWS) > 2


def test_ranks_round_up_only_where_the_timer_says_it_pays(monkeypatch):
    times = {None: 10.0, 20: 4.0, 22: 4.0, 24: 3.0, 32: 2.0, 64: 1.0}
    monkeypatch.setattr(speed, "layer_seconds", lambda shape, rank, *a, **k: times[rank])
    # 24 is within 1/8 of 22 and faster; 32 and 64 add too much
    assert speed.fastest_rank((256, 256), 22, "decode") == 24
    assert speed.fastest_rank((256, 256), 20, "decode") == 20  # 24 is more than 1/8 above 20
    times[24] = 3.95  # not measurably faster (above 0.97 of 4.0)
    assert speed.fastest_rank((256, 256), 22, "decode") == 22
    assert speed.fastest_rank((256, 22), 20, "decode") == 20  # 24 x (256 + 22) would not save parameters
    times.update({60: 5.0})
    assert speed.fastest_rank((256, 256), 60, "decode") == 64  # 64 <= 60 * 1.125 and faster


def test_measured_mode_rounds_ranks_in_the_report(monkeypatch):
    monkeypatch.setattr(speed, "layer_seconds", lambda shape, rank, *a, **k: 1.0 if rank is None
                        else (0.1 if rank % 8 == 0 else 0.5))
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 2))
    report = sc.compress_(model, sc.SVDConfig(rank=30, speed_for="decode"))
    assert model[0].rank == 32 and report.compressed[0].rank == 32
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 2))  # round_to wins over the timer
    sc.compress_(model, sc.SVDConfig(rank=30, speed_for="decode", round_to=4))
    assert model[0].rank == 32  # 30 rounded up to a multiple of 4


def test_a_cached_timing_is_not_measured_twice(monkeypatch):
    speed._cache.clear()
    calls = []
    real = speed._seconds
    monkeypatch.setattr(speed, "_seconds", lambda fn: calls.append(1) or real(fn, min_time=1e-4, repeats=2))
    speed.layer_seconds((16, 16), 4, 1)
    speed.layer_seconds((16, 16), 4, 1)
    speed.layer_seconds((16, 16), None, 1)
    assert len(calls) == 2


def test_speed_for_is_validated_and_reaches_the_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="speed_for"):
        sc.SVDConfig(rank=2, speed_for="fast")
    assert main(["compress", "x", "--rank", "2", "--speed-for", "fast", "--out", str(tmp_path / "o")]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_a_timing_reads_its_weights_from_memory_not_the_cache(monkeypatch):
    # a model's forward pass streams each layer's weights from memory: the timed product
    # cycles through copies of them filling COLD_BYTES, and the time is per product; the
    # factors have the layer's own layout (u column by column)
    speed._cache.clear()
    monkeypatch.setattr(speed, "COLD_BYTES", 10 * 64 * 64 * 4)
    seen = []
    real_linear = torch.nn.functional.linear

    def linear(x, w, b=None):
        seen.append((w.data_ptr(), w.stride()))
        return real_linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    monkeypatch.setattr(speed, "_seconds", lambda fn: (seen.clear(), fn(), 1.0)[2])
    assert speed.layer_seconds((64, 64), None, 1) == pytest.approx(1 / 10)
    assert len({p for p, _ in seen}) == 10
    assert speed.layer_seconds((64, 64), 16, 1) == pytest.approx(1 / 20)  # 16 x 128 = half the bytes
    assert len({p for p, _ in seen}) == 40 and (1, 64) in {s for _, s in seen}


def test_generate_factorises_a_layer_only_where_it_is_faster_at_one_row_and_at_many(monkeypatch):
    # a generating model runs both phases: a layer faster in prefill but slower in decode
    # stays dense for speed_for="generate", and its report names the slower setting
    times = {(None, 1): 1.0, (None, 512): 10.0, (16, 1): 1.5, (16, 512): 4.0,
             (40, 1): 0.5, (40, 512): 8.0, (48, 1): 0.4, (48, 512): 5.0}
    monkeypatch.setattr(speed, "layer_seconds", lambda shape, rank, rows, *a, **k: times[rank, rows])
    model = lambda: nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 2))  # noqa: E731
    m = model()
    report = sc.compress_(m, sc.SVDConfig(rank=16, speed_for="generate"))
    assert type(m[0]) is nn.Linear
    assert report.layers[0].reason is sc.KeepDense.NOT_FASTER and "0.67x" in report.layers[0].detail \
        and "on 1 row(s)" in report.layers[0].detail
    m = model()
    sc.compress_(m, sc.SVDConfig(rank=16, speed_for="prefill"))
    assert m[0].rank == 16
    assert speed.slowest_speedup((128, 128), 40, "generate") == (1.25, 512)
    # 48 is faster at one row but not at 512: no rounding for generate, rounding for decode
    times[44, 1], times[44, 512] = 0.5, 5.0
    assert speed.fastest_rank((128, 128), 44, "generate") == 44
    assert speed.fastest_rank((128, 128), 44, "decode") == 48
