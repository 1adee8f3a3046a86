"""The pure tensor functions against closed forms and independent references (SPEC §1–4)."""
import math

import numpy as np
import pytest
import torch
from reference import reference_evbmf, reference_metrics

from lightning_probes.functional import (
    aggregate,
    channel_weights,
    evbmf,
    minimize_scalar_bounded,
    singular_values,
    spectral_metrics,
    unfold_in,
    unfold_out,
)

F64 = torch.float64


def random_matrix(rows, cols, generator, kind="gaussian"):
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=generator, dtype=F64)
    if kind == "low_rank_noise":
        rank = max(1, min(rows, cols) // 8)
        signal = torch.randn(rows, rank, generator=generator, dtype=F64) @ torch.randn(
            rank, cols, generator=generator, dtype=F64)
        return signal * 3 / math.sqrt(cols) + 0.1 * torch.randn(rows, cols, generator=generator, dtype=F64)
    if kind == "heavy_tailed":
        return torch.distributions.StudentT(2.0).sample((rows, cols)).to(F64)
    raise ValueError(kind)


SHAPES = [(1, 1), (1, 37), (37, 1), (5, 5), (16, 144), (64, 64), (96, 40), (3, 600), (128, 1152)]
KINDS = ["gaussian", "low_rank_noise", "heavy_tailed"]


# ---- unfoldings -------------------------------------------------------------------------------

def test_unfoldings_of_a_hand_built_conv_weight():
    # weight[o, i, h, w] = 1000 o + 100 i + 10 h + w makes every entry's origin readable.
    o, i, h, w = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(2), torch.arange(2), indexing="ij")
    weight = (1000 * o + 100 * i + 10 * h + w).to(F64)
    inward = unfold_in(weight)
    outward = unfold_out(weight)
    assert inward.shape == (3, 8) and outward.shape == (2, 12)
    # mode-3: row = input channel, columns run over (out, kh, kw)
    assert inward[2].tolist() == [200, 201, 210, 211, 1200, 1201, 1210, 1211]
    # mode-4: row = output channel, columns run over (in, kh, kw)
    assert outward[1].tolist() == [1000, 1001, 1010, 1011, 1100, 1101, 1110, 1111, 1200, 1201, 1210, 1211]
    assert channel_weights(tuple(weight.shape)) == (3, 2)


def test_conv1d_conv3d_and_linear_follow_the_same_rule():
    assert unfold_in(torch.zeros(4, 6, 5)).shape == (6, 20)
    assert unfold_out(torch.zeros(4, 6, 5)).shape == (4, 30)
    assert unfold_in(torch.zeros(4, 6, 3, 3, 3)).shape == (6, 108)
    linear = torch.randn(7, 3)
    assert unfold_in(linear) is linear and unfold_out(linear) is linear
    assert channel_weights((7, 3)) == (3, 3)


# ---- spectra ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_singular_values_match_float64_svd(kind, generator):
    for rows, cols in SHAPES:
        batch = torch.stack([random_matrix(rows, cols, generator, kind) for _ in range(3)])
        expected = torch.linalg.svdvals(batch)
        got = singular_values(batch)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.max()))


def test_ill_conditioned_matrices_fall_back_to_svd(generator):
    u, _ = torch.linalg.qr(torch.randn(50, 50, generator=generator, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(80, 80, generator=generator, dtype=F64))
    s = torch.logspace(0, -9, 50, dtype=F64)
    matrix = u @ torch.diag(s) @ v[:50]
    got = singular_values(matrix[None])[0]
    torch.testing.assert_close(got, torch.linalg.svdvals(matrix), rtol=1e-9, atol=1e-15)
    assert float(got[-1]) == pytest.approx(1e-9, rel=1e-5)


def test_low_precision_inputs_are_upcast_by_the_caller_and_exact(generator):
    weight = torch.randn(32, 96, generator=generator).to(torch.bfloat16)
    got = singular_values(weight.to(F64)[None])[0]
    torch.testing.assert_close(got, torch.linalg.svdvals(weight.to(F64)), rtol=1e-9, atol=1e-12)


# ---- metrics: closed forms --------------------------------------------------------------------

def test_orthogonal_and_identity_matrices(generator):
    for n in (1, 4, 33):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=F64))
        for matrix in (q, torch.eye(n, dtype=F64)):
            m = spectral_metrics(singular_values(matrix[None]))
            assert float(m.C[0]) == pytest.approx(1.0, rel=1e-12)
            assert float(m.S[0]) == pytest.approx(1.0, rel=1e-12)
            assert float(m.ER[0]) == pytest.approx(math.log(n), abs=1e-12)
            assert float(m.SQ[0]) == pytest.approx(math.pi / 2, rel=1e-12)
            assert float(m.fro[0]) == pytest.approx(math.sqrt(n), rel=1e-12)


def test_diagonal_matrix_with_chosen_singular_values():
    values = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=F64)
    m = spectral_metrics(singular_values(torch.diag(values)[None]))
    p = values / values.sum()
    assert float(m.S[0]) == pytest.approx((1 + 0.5 + 0.25 + 0.125) / 4)
    assert float(m.C[0]) == pytest.approx(8.0)
    assert float(m.ER[0]) == pytest.approx(float(-(p * p.log()).sum()))
    assert float(m.spec[0]) == pytest.approx(4.0)
    assert float(m.fro[0]) == pytest.approx(math.sqrt(16 + 4 + 1 + 0.25))
    assert float(m.SQ[0]) == pytest.approx(math.atan2(1.875 / 4, 1 - 1 / 8))


def test_rank_one_matrix(generator):
    u = torch.randn(6, 1, generator=generator, dtype=F64)
    v = torch.randn(1, 9, generator=generator, dtype=F64)
    m = spectral_metrics(torch.linalg.svdvals((u @ v)[None]))
    assert float(m.S[0]) == pytest.approx(1 / 6, rel=1e-9)
    assert float(m.ER[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(m.spec[0]) == pytest.approx(float(u.norm() * v.norm()), rel=1e-12)
    assert float(m.C[0]) > 1e12
    assert float(m.SQ[0]) == pytest.approx(math.atan2(1 / 6, 1), rel=1e-9)


def test_exact_zero_singular_value_gives_infinite_condition_and_finite_sq():
    m = spectral_metrics(torch.tensor([[3.0, 1.0, 0.0]], dtype=F64))
    assert math.isinf(float(m.C[0]))
    assert float(m.SQ[0]) == pytest.approx(math.atan2(4 / 9, 1.0))


def test_all_zero_matrix_is_undefined_but_has_zero_norms():
    m = spectral_metrics(torch.zeros(1, 3, dtype=F64))
    assert all(math.isnan(float(getattr(m, k)[0])) for k in ("S", "C", "ER", "SQ"))
    assert float(m.spec[0]) == 0 and float(m.fro[0]) == 0


def test_scale_invariance_and_linear_norm_scaling(generator):
    matrix = torch.randn(20, 45, generator=generator, dtype=F64)
    base = spectral_metrics(singular_values(matrix[None]))
    scaled = spectral_metrics(singular_values((7.5 * matrix)[None]))
    for key in ("S", "C", "ER", "SQ"):
        assert float(getattr(scaled, key)[0]) == pytest.approx(float(getattr(base, key)[0]), rel=1e-10)
    for key in ("spec", "fro"):
        assert float(getattr(scaled, key)[0]) == pytest.approx(7.5 * float(getattr(base, key)[0]), rel=1e-10)


def test_kept_values_use_the_full_n_and_no_kept_value_gives_zeros():
    values = torch.tensor([[4.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    m = spectral_metrics(values, torch.tensor([2, 0]))
    assert float(m.S[0]) == pytest.approx((1 + 0.5) / 4)
    assert float(m.C[0]) == pytest.approx(2.0)
    assert float(m.SQ[0]) == pytest.approx(math.atan2(1.5 / 4, 0.5))
    assert all(float(v[1]) == 0.0 for v in m)


# ---- EVBMF against scipy's bounded minimiser ---------------------------------------------------

def test_batched_minimiser_matches_scipy_on_several_functions():
    from scipy.optimize import minimize_scalar

    centres = torch.tensor([0.3, 2.0, -1.0, 5.0], dtype=F64)
    func = lambda x: (x - centres) ** 2 + torch.sin(3 * x)  # noqa: E731
    lower = torch.tensor([0.0, 1.0, -3.0, 4.9], dtype=F64)
    upper = torch.tensor([1.0, 4.0, 2.0, 4.9], dtype=F64)
    got = minimize_scalar_bounded(func, lower, upper)
    for i in range(4):
        want = minimize_scalar(lambda x: (x - float(centres[i])) ** 2 + math.sin(3 * x),
                               bounds=[float(lower[i]), float(upper[i])], method="bounded")
        assert float(got.x[i]) == pytest.approx(want.x, rel=1e-12, abs=1e-15)
        assert int(got.nfev[i]) == want.nfev


@pytest.mark.parametrize("kind", KINDS)
def test_evbmf_matches_scipy_reference(kind, generator):
    kept_somewhere = 0
    for rows, cols in SHAPES + [(64, 576), (10, 4000)]:
        batch = torch.stack([random_matrix(rows, cols, generator, kind) for _ in range(3)])
        s = singular_values(batch)
        result = evbmf(s, max(rows, cols))
        for i in range(len(batch)):
            want, sigma2 = reference_evbmf(s[i].numpy(), max(rows, cols))
            assert int(result.rank[i]) == len(want), (rows, cols, kind)
            assert float(result.noise_variance[i]) == pytest.approx(sigma2, rel=1e-6)
            np.testing.assert_allclose(result.values[i, : len(want)].numpy(), want, rtol=1e-6)
            assert torch.all(result.values[i, len(want):] == 0)
            kept_somewhere += len(want)
    if kind != "gaussian":  # pure noise keeps nothing; the others must compare kept components
        assert kept_somewhere > 0


def test_evbmf_recovers_a_planted_rank(generator):
    signal = torch.randn(40, 3, generator=generator, dtype=F64) @ torch.randn(3, 200, generator=generator, dtype=F64)
    noisy = signal + 0.05 * torch.randn(40, 200, generator=generator, dtype=F64)
    result = evbmf(singular_values(noisy[None]), 200)
    assert int(result.rank[0]) == 3
    assert float(result.noise_variance[0]) == pytest.approx(0.05**2, rel=0.2)


def test_ae_metrics_of_reference_values(generator):
    noisy = random_matrix(48, 300, generator, "low_rank_noise")
    s = singular_values(noisy[None])
    result = evbmf(s, 300)
    got = spectral_metrics(result.values, result.rank)
    want = reference_metrics(reference_evbmf(s[0].numpy(), 300)[0], 48)
    assert int(result.rank[0]) > 0
    for key, value in want.items():
        assert float(getattr(got, key)[0]) == pytest.approx(value, rel=1e-6)


# ---- aggregates -------------------------------------------------------------------------------

def test_aggregates_by_hand_with_masking():
    x = torch.tensor([2.0, 0.0, 8.0, float("nan"), float("inf"), 1.0], dtype=F64)
    w = torch.tensor([1.0, 9.0, 3.0, 9.0, 9.0, 4.0], dtype=F64)
    got = aggregate(x, w)
    kept, weights = np.array([2.0, 8.0, 1.0]), np.array([1.0, 3.0, 4.0])
    assert float(got.L1) == pytest.approx(kept.mean())
    assert float(got.L2) == pytest.approx(np.sqrt((kept**2).sum()) / np.sqrt(3))
    assert float(got.p) == pytest.approx(np.prod(kept) ** (1 / 3))
    assert float(got.wL1) == pytest.approx((weights * kept).sum() / weights.sum())
    assert float(got.wp) == pytest.approx(np.prod(kept ** (weights / weights.sum())))


def test_aggregate_over_no_entries_is_zero_not_nan():
    for x in (torch.zeros(0, dtype=F64), torch.tensor([0.0, float("nan"), float("-inf")], dtype=F64)):
        got = aggregate(x, torch.ones_like(x))
        assert all(float(v) == 0.0 for v in got)


def test_aggregate_geometric_mean_is_stable_in_log_space():
    x = torch.full((2000,), 1e-200, dtype=F64)
    assert float(aggregate(x, torch.ones_like(x)).p) == pytest.approx(1e-200, rel=1e-9)


def test_aggregate_is_batched_over_leading_dims():
    x = torch.tensor([[1.0, 4.0], [9.0, 0.0]], dtype=F64)
    got = aggregate(x, torch.ones_like(x))
    assert got.p.tolist() == pytest.approx([2.0, 9.0])


def test_evbmf_of_a_ragged_batch_equals_each_matrix_alone(generator):
    shapes = [(4, 30), (16, 144), (1, 9), (40, 40), (12, 500)]
    spectra = [singular_values(random_matrix(r, c, generator, "low_rank_noise")[None])[0] for r, c in shapes]
    padded = torch.zeros(len(shapes), 40, dtype=F64)
    for slot, s in zip(padded, spectra):
        slot[: len(s)] = s
    together = evbmf(padded, [c for _, c in shapes], rows=[r for r, _ in shapes])
    for i, (s, (rows, cols)) in enumerate(zip(spectra, shapes)):
        alone = evbmf(s[None], cols)
        assert int(together.rank[i]) == int(alone.rank[0])
        torch.testing.assert_close(together.noise_variance[i], alone.noise_variance[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(together.values[i, :rows], alone.values[0], rtol=1e-12, atol=0)
        assert torch.all(together.values[i, rows:] == 0)
    assert int(together.rank.sum()) > 0


def test_evbmf_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="rows <= cols"):
        evbmf(torch.ones(1, 5, dtype=F64), 3)
    with pytest.raises(ValueError, match="one entry per matrix"):
        evbmf(torch.ones(2, 5, dtype=F64), [9], rows=[5, 5])
