import pytest
import torch
from torch import nn

from svdcompress.core.factorize import svd
from svdcompress.core.layers import LowRankConv2d, LowRankLinear


def frob2(t):
    return float(t.detach().double().square().sum())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_full_rank_linear_reproduces_output(dtype, tol):
    torch.manual_seed(0)
    lin = nn.Linear(9, 16).to(dtype)
    x = torch.randn(5, 9, dtype=dtype)
    low = LowRankLinear.from_linear(lin, rank=9)
    assert low.u.dtype == dtype and low.rank == 9
    torch.testing.assert_close(low(x), lin(x), atol=tol, rtol=tol)


def test_linear_truncation_error_is_sum_of_dropped_singular_values():
    torch.manual_seed(1)
    lin = nn.Linear(30, 20).double()
    s = svd(lin.weight).S
    for d in (1, 5, 12):
        low = LowRankLinear.from_linear(lin, rank=d)
        err = frob2(lin.weight - low.dense_weight())
        assert err == pytest.approx(float(s[d:].square().sum()), rel=1e-9)


@pytest.mark.parametrize("kwargs", [
    dict(stride=1, padding=1), dict(stride=2, padding=0, dilation=2),
    dict(padding="same", padding_mode="reflect"), dict(padding=2, padding_mode="circular", bias=False),
])
def test_full_rank_conv_reproduces_output(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, **kwargs).double()
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    low = LowRankConv2d.from_conv2d(conv, rank=8)  # full rank of the 8 x 27 matrix
    torch.testing.assert_close(low(x), conv(x), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(low.to_dense()(x), conv(x), atol=1e-10, rtol=1e-10)


def test_conv_truncation_error_is_eckart_young():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 12, 3).double()
    w = conv.weight.reshape(12, -1)
    s = svd(w).S
    for d in (1, 3, 7):
        low = LowRankConv2d.from_conv2d(conv, rank=d)
        assert frob2(conv.weight - low.dense_weight()) == pytest.approx(float(s[d:].square().sum()), rel=1e-9)
        # and the layer really is a kxk conv to D channels then a 1x1 conv
        assert low.v.shape == (d, 4, 3, 3) and low.u.shape == (12, d, 1, 1)


def test_float32_conv_loose_tolerance():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(LowRankConv2d.from_conv2d(conv, 5)(x), conv(x), atol=1e-4, rtol=1e-4)


def test_grouped_conv_rejected():
    with pytest.raises(ValueError, match="grouped"):
        LowRankConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2), 2)


def test_to_dense_round_trip_and_dtype():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False).double()
    low = LowRankLinear.from_linear(lin, 2)
    dense = low.to_dense()
    assert dense.bias is None and dense.weight.dtype == torch.float64
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(dense(x), low(x))


def test_half_precision_weights_are_factorized():
    lin = nn.Linear(8, 8).to(torch.bfloat16)
    low = LowRankLinear.from_linear(lin, 8)
    assert low.u.dtype == torch.bfloat16
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(low(x), lin(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("rank", [0, -1, 1.5, None])
def test_bad_rank_rejected(rank):
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 4, rank)


def test_factors_are_trainable():
    low = LowRankLinear.from_linear(nn.Linear(5, 3), 2)
    low(torch.randn(4, 5)).sum().backward()
    assert low.u.grad is not None and low.v.grad is not None and low.bias.grad is not None


# ---------------------------------------------------------------- weight, as the dense layer's

@pytest.mark.parametrize("make", [lambda: LowRankLinear.from_linear(nn.Linear(9, 16), 3),
                                  lambda: LowRankConv2d.from_conv2d(nn.Conv2d(3, 8, 3), 2)])
def test_weight_answers_dtype_device_and_shape_and_is_the_product_when_used(make):
    torch.manual_seed(0)
    low = make().double()
    dense = low.to_dense()
    w = low.weight
    assert w.dtype == torch.float64 and w.device == low.u.device
    assert w.shape == dense.weight.shape and w.ndim == dense.weight.dim() and w.size(0) == dense.weight.size(0)
    torch.testing.assert_close(w(), dense.weight)  # called, as before it was a property
    torch.testing.assert_close(w.T, dense.weight.T)  # any other attribute: the dense tensor's
    torch.testing.assert_close(w * 2, dense.weight * 2)
    torch.testing.assert_close(torch.flatten(w), torch.flatten(dense.weight))  # torch functions
    with pytest.raises((AttributeError, KeyError)):
        low.weight = nn.Parameter(dense.weight)  # read-only: the factors are the parameters
    assert "weight" not in low.state_dict()


def test_model_code_that_reads_weight_dtype_runs_after_compression():
    import svdcompress as sc

    class PatchEmbed(nn.Module):  # as a ViT's embeddings read their projection's dtype
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 16, 4, stride=4)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            h = self.proj(x.to(self.proj.weight.dtype)).flatten(2).mean(-1)
            return self.head(torch.nn.functional.linear(h, torch.eye(16, dtype=self.head.weight.dtype)))

    torch.manual_seed(0)
    model = PatchEmbed()
    x = torch.randn(2, 3, 8, 8)
    sc.compress_(model, sc.SVDConfig(rank=2))
    assert isinstance(model.proj, LowRankConv2d)
    assert model(x).shape == (2, 2)
    assert torch.nn.functional.linear(torch.randn(1, 48), model.proj.weight.reshape(16, -1)).shape == (1, 16)


# ---------------------------------------------------------------- memory layout of the factors

def _column_major(t: torch.Tensor) -> bool:
    return t.stride() == (1, t.shape[0])


def test_output_factor_is_stored_column_by_column_wherever_the_layer_goes(tmp_path):
    # one token's product reads a thin u (m x D) faster stored this way
    # (benchmarks/factor_layout.py); the values, the output and the files are unchanged
    import copy

    import svdcompress as sc
    from svdcompress.core.layers import Int8LowRankLinear
    torch.manual_seed(0)
    base = lambda: nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 3))  # noqa: E731
    model = base()
    x = torch.randn(5, 24)
    sc.compress_(model, sc.SVDConfig(rank=6))
    low = model[0]
    assert _column_major(low.u) and low.v.is_contiguous()
    torch.testing.assert_close(low(x), x @ (low.u.detach().contiguous() @ low.v).T + low.bias, rtol=0, atol=1e-5)
    for moved in (copy.deepcopy(low), low.double(), LowRankLinear(24, 40, 6), LowRankLinear.from_factors(
            low.u.detach().contiguous(), low.v.detach(), low.bias.detach())):
        assert _column_major(moved.u)
    low.float()(x).sum().backward()
    assert low.u.grad.stride() == low.u.stride()  # (the gradient follows its parameter)
    state = model.state_dict()  # u itself, as for any module: an EMA or a tie through it holds
    assert state["0.u"].data_ptr() == low.u.data_ptr() and torch.equal(state["0.u"], low.u)
    from safetensors.torch import load_file, save_file
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "plain.safetensors")
    again = base()
    sc.compress_(again, sc.SVDConfig(rank=6))
    again.load_state_dict(load_file(tmp_path / "plain.safetensors"))
    assert _column_major(again[0].u) and torch.equal(again[0].u, low.u)
    sc.save(model, tmp_path / "run")
    loaded = sc.load(tmp_path / "run", model=base())
    assert _column_major(loaded[0].u) and torch.equal(loaded[0].u, low.u)
    q = Int8LowRankLinear.from_low_rank(low)
    assert _column_major(q.u_int8) and _column_major(q.u_int8.to(torch.float32))
