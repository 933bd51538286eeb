import json

import pytest
import torch
from torch import nn

import svdcompress as sc
from svdcompress.study import MLP
from svdcompress.integrations.bench import count_macs
from svdcompress.cli import main
from svdcompress.core.rank import round_rank, truncation_error


def test_rank_rounding_never_raises_the_error():
    g = torch.Generator().manual_seed(0)
    for m, n in [(30, 20), (64, 48), (9, 100)]:
        s = torch.linalg.svdvals(torch.randn(m, n, generator=g))
        for d in range(1, min(m, n) + 1):
            r = round_rank(d, 8, (m, n))
            assert d <= r <= min(m, n) and (r % 8 == 0 or r == min(m, n))
            assert truncation_error(s, r) <= truncation_error(s, d)


def test_compress_rounds_ranks_and_reports_them(toy):
    report = sc.compress_(toy, sc.SVDConfig(rank=3, round_to=8))
    assert {r.name: r.rank for r in report.compressed}["block.proj"] == 8
    assert toy.block.proj.rank == 8


def test_keep_dense_rule():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 2))
    # rank 16 on 64x64: 4096 / (16 * 128) = 2x fewer multiply-adds
    report = sc.compress_(model, sc.SVDConfig(rank=16, min_speedup=2.5))
    assert not report.compressed and report.layers[0].reason is sc.KeepDense.NOT_FASTER
    assert type(model[0]) is nn.Linear
    report = sc.compress_(model, sc.SVDConfig(rank=16, min_speedup=1.5))
    assert len(report.compressed) == 2
    with pytest.raises(ValueError, match="min_speedup"):
        sc.SVDConfig(rank=2, min_speedup=0.5)
    with pytest.raises(ValueError, match="round_to"):
        sc.SVDConfig(rank=2, round_to=0)


def test_macs_count_dense_and_factorized(toy, toy_input):
    dense = count_macs(toy, {"x": toy_input})
    sc.compress_(toy, sc.SVDConfig(rank=2))
    low = count_macs(toy, {"x": toy_input})
    b = toy_input.shape[0]
    # proj 128 -> 32 becomes 2 * (128 + 32) per sample
    assert dense - low >= b * (128 * 32 - 2 * 160)
    mlp = MLP(20, [16], 3)
    assert count_macs(mlp, {"x": torch.randn(5, 20)}) == 5 * (20 * 16 + 16 * 3)


def test_bench_json_schema(tmp_path, capsys):
    mlp = MLP(20, [16, 16], 3)
    sc.compress_(mlp, sc.SVDConfig(rank=4))
    sc.save(mlp, tmp_path / "run")
    assert main(["bench", str(tmp_path / "run"), "--batch", "1,8", "--repeats", "3", "--threads", "1"]) == 0
    result = json.loads((tmp_path / "run" / "bench.json").read_text())
    assert result["threads"] == 1 and result["run"] == str(tmp_path / "run")
    assert [r["batch"] for r in result["rows"]] == [1, 8]
    for r in result["rows"]:
        assert set(r) >= {"device", "batch", "dense_ms", "compressed_ms", "speedup", "flop_ratio",
                          "dense_per_second", "compressed_per_second"}
        assert r["dense_ms"] > 0 and r["compressed_ms"] > 0
        assert r["flop_ratio"] == pytest.approx((20 * 16 + 16 * 16 + 16 * 3) / (4 * 36 + 4 * 32 + 16 * 3))
    assert main(["bench", str(tmp_path / "missing")]) == 2


def test_onnx_export_round_trip(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    mlp = MLP(20, [16, 16], 3)
    sc.compress_(mlp, sc.SVDConfig(rank=4))
    sc.save(mlp, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert sum(op in ("MatMul", "Gemm") for op in ops) == 5  # two per low-rank layer + output
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 20)  # another batch size than the export's: the batch axis is dynamic
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), mlp(x).detach(), atol=1e-4, rtol=1e-3)
