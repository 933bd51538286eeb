import math

import pytest
import torch

from svdcompress.core.rank import RankSpec, choose_rank, numerical_rank, saves_parameters, truncation_error


def sv(matrix):
    return torch.linalg.svdvals(matrix)


def test_fixed_rank_clamped_to_matrix_size():
    s = sv(torch.randn(6, 4))
    assert choose_rank(s, RankSpec("rank", 3), (6, 4)) == 3
    assert choose_rank(s, RankSpec("rank", 50), (6, 4)) == 4


def test_energy_picks_smallest_rank_reaching_fraction():
    # singular values 4, 2, 1 -> energies 16, 4, 1 of 21
    w = torch.diag(torch.tensor([4.0, 2.0, 1.0]))
    s = sv(w)
    assert choose_rank(s, RankSpec("energy", 16 / 21), (3, 3)) == 1
    assert choose_rank(s, RankSpec("energy", 16 / 21 + 1e-6), (3, 3)) == 2
    assert choose_rank(s, RankSpec("energy", 20 / 21), (3, 3)) == 2
    assert choose_rank(s, RankSpec("energy", 1.0), (3, 3)) == 3


def test_energy_one_on_rank_deficient_matrix_gives_its_rank():
    torch.manual_seed(0)
    w = torch.randn(20, 3) @ torch.randn(3, 30)  # rank 3, float32 round-off in the tail
    s = sv(w)
    assert numerical_rank(s, (20, 30)) == 3
    assert choose_rank(s, RankSpec("energy", 1.0), (20, 30)) == 3


def test_all_zero_matrix():
    s = sv(torch.zeros(5, 7))
    assert choose_rank(s, RankSpec("energy", 0.9), (5, 7)) == 1
    assert choose_rank(s, RankSpec("rank", 2), (5, 7)) == 2
    assert choose_rank(s, RankSpec("ratio", 0.5), (5, 7)) == 1  # floor(0.5*35/12)
    assert truncation_error(s, 1) == 0.0


def test_ratio_keeps_at_most_that_fraction_of_parameters():
    for m, n, r in [(1024, 784, 0.1), (10, 20, 0.5), (64, 64, 0.25), (3, 100, 0.99)]:
        d = choose_rank(sv(torch.randn(m, n)), RankSpec("ratio", r), (m, n))
        assert 1 <= d <= min(m, n)
        assert d * (m + n) <= r * m * n or d == 1
        assert (d + 1) * (m + n) > r * m * n or d == min(m, n)


def test_ratio_one_keeps_every_layer_whole():
    # every parameter kept: the full rank (the layer stays dense), not a lossy rank that
    # saves a rounding's worth of parameters (576 x 1536 at ratio 1 was rank 418 of 576)
    for shape in [(576, 1536), (10, 20), (64, 64)]:
        d = choose_rank(None, RankSpec("ratio", 1.0), shape)
        assert d == min(shape) and not saves_parameters(d, shape)


def test_saves_parameters_boundary():
    assert saves_parameters(4, (10, 10))  # 80 < 100
    assert not saves_parameters(5, (10, 10))  # 100 == 100
    assert not saves_parameters(6, (10, 10))


def test_truncation_error_is_eckart_young():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert truncation_error(s, 1) == pytest.approx(math.sqrt(5 / 14))
    assert truncation_error(s, 3) == 0.0


@pytest.mark.parametrize("kind,value,field", [
    ("rank", 0, "rank"), ("rank", -3, "rank"), ("rank", 2.5, "rank"), ("rank", True, "rank"),
    ("energy", 0.0, "energy"), ("energy", 1.5, "energy"), ("energy", float("nan"), "energy"),
    ("ratio", 0, "ratio"), ("ratio", -0.1, "ratio"), ("ratio", "0.5", "ratio"),
    ("bogus", 1, "kind"),
])
def test_invalid_specs_raise_naming_the_field(kind, value, field):
    with pytest.raises(ValueError, match=field):
        RankSpec(kind, value)
