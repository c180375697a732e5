"""Decomposition math, checked against independent computations (planted factors, brute force, samples)."""

import ast
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize

from onnx_dacomp.decompose.bias import centered_covariance, refit_bias
from onnx_dacomp.decompose.covariance import regularize, sigma_error, whiten
from onnx_dacomp.decompose.cp import cp_als, da_cp
from onnx_dacomp.decompose.factors import (
    ChannelFactors,
    CPFactors,
    SVDFactors,
    Tucker2Factors,
    reconstruct,
    weight_shape,
)
from onnx_dacomp.decompose.svd import da_svd, truncated_svd
from onnx_dacomp.decompose.tucker2 import da_tucker2, tucker2_hooi

DECOMPOSE = Path(__file__).resolve().parents[1] / "onnx_dacomp" / "decompose"


def test_math_package_imports_only_numpy_and_scipy():
    allowed = {"numpy", "scipy", "__future__", "dataclasses", "collections", "math", "typing"}
    for path in DECOMPOSE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:  # relative: must stay inside decompose/
                    assert node.level == 1, f"{path.name} imports from outside decompose/"
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


def anisotropic_sigma(n, rng, samples=None):
    """Second moment of correlated, unevenly scaled samples (rank-deficient when samples < n)."""
    samples = samples or 4 * n
    mixing = rng.standard_normal((n, n)) * np.logspace(-1.5, 0.5, n)
    x = rng.standard_normal((samples, n)) @ mixing.T + 0.2
    return x.T @ x / samples


def planted_tucker(rng, shape, ranks):
    t, s, *kernel = shape
    core = rng.standard_normal((ranks[0], ranks[1], *kernel))
    return np.einsum("ab...,ta,sb->ts...", core, rng.standard_normal((t, ranks[0])), rng.standard_normal((s, ranks[1])))


def planted_cp(rng, shape, rank):
    return reconstruct(
        CPFactors(
            rng.standard_normal((shape[1], rank)),
            tuple(rng.standard_normal((k, rank)) for k in shape[2:]),
            rng.standard_normal((shape[0], rank)),
        )
    )


@pytest.mark.parametrize("seed", range(3))
def test_planted_low_rank_weights_are_recovered_exactly(seed):
    rng = np.random.default_rng(seed)
    shape = (10, 8, 3, 3)
    sigma = anisotropic_sigma(8 * 9, rng)
    matrix_weight = (rng.standard_normal((10, 3)) @ rng.standard_normal((3, 72))).reshape(shape)
    assert da_svd(matrix_weight, sigma, 3).rel_error < 1e-12
    assert truncated_svd(matrix_weight, 3).rel_error < 1e-12
    tucker_weight = planted_tucker(rng, shape, (4, 3))
    for result in (da_tucker2(tucker_weight, sigma, (4, 3)), tucker2_hooi(tucker_weight, (4, 3))):
        assert result.rel_error < 1e-12
        assert np.allclose(reconstruct(result.factors), tucker_weight, atol=1e-8 * np.abs(tucker_weight).max())
    cp_weight = planted_cp(rng, shape, 3)
    for result in (da_cp(cp_weight, sigma, 3), cp_als(cp_weight, 3)):
        assert result.rel_error < 1e-10
        assert np.allclose(reconstruct(result.factors), cp_weight, atol=1e-4 * np.abs(cp_weight).max())


@pytest.mark.parametrize("kernel", [(3,), (3, 3, 3)])
def test_planted_cp_weights_of_1d_and_3d_convs_are_recovered(kernel):
    # the ALS contracts every spatial factor but one: with a single spatial axis there is none to contract
    rng = np.random.default_rng(7)
    factors = CPFactors(
        rng.standard_normal((5, 3)), tuple(rng.standard_normal((k, 3)) for k in kernel), rng.standard_normal((6, 3))
    )
    weight = reconstruct(factors)
    sigma = anisotropic_sigma(5 * int(np.prod(kernel)), rng)
    for result in (da_cp(weight, sigma, 3, max_iter=500), cp_als(weight, 3, max_iter=500)):
        assert result.rel_error < 1e-8
        assert np.allclose(reconstruct(result.factors), weight, atol=1e-3 * np.abs(weight).max())


def test_full_rank_reconstruction_is_exact():
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((6, 5, 3, 2))
    sigma = anisotropic_sigma(30, rng)
    assert np.allclose(reconstruct(da_svd(weight, sigma, 6).factors), weight)
    assert np.allclose(reconstruct(truncated_svd(weight, 6).factors), weight)
    assert np.allclose(reconstruct(da_tucker2(weight, sigma, (6, 5)).factors), weight)
    assert np.allclose(reconstruct(tucker2_hooi(weight, (6, 5)).factors), weight)
    small = rng.standard_normal((2, 2, 2, 2))  # CP rank of a 2x2x2x2 tensor is at most 8 (= S * kh * kw)
    for result in (
        da_cp(small, anisotropic_sigma(8, rng), 8, max_iter=2000, tol=0),
        cp_als(small, 8, max_iter=2000, tol=0),
    ):
        assert result.rel_error < 1e-8


def test_identity_sigma_gives_the_frobenius_solutions():
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((12, 7, 3, 3))
    eye = np.eye(63)
    np.testing.assert_allclose(
        reconstruct(da_svd(weight, eye, 4).factors), reconstruct(truncated_svd(weight, 4).factors), atol=1e-10
    )
    hooi = tucker2_hooi(weight, (5, 4), tol=1e-13, max_iter=2000)
    da = da_tucker2(weight, eye, (5, 4), tol=1e-13, max_iter=2000, floor=0.0)
    assert da.rel_error == pytest.approx(hooi.rel_error, abs=1e-9)
    np.testing.assert_allclose(reconstruct(da.factors), reconstruct(hooi.factors), atol=1e-5)
    # CP: same initialization and sweep order give the same iterates
    frob = cp_als(weight, 6, max_iter=40, tol=0)
    same = da_cp(weight, eye, 6, init="svd", max_iter=40, tol=0, floor=0.0)
    np.testing.assert_allclose(same.history[1:], frob.history, rtol=1e-7)
    np.testing.assert_allclose(reconstruct(same.factors), reconstruct(frob.factors), atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_da_never_worse_than_frobenius_in_sigma_norm_and_history_monotone(seed):
    rng = np.random.default_rng(10 + seed)
    weight = rng.standard_normal((16, 10, 3, 3))
    sigma = anisotropic_sigma(90, rng, samples=60 if seed % 2 else None)  # odd seeds: rank-deficient
    for rank in (2, 6):
        assert (
            sigma_error(weight, reconstruct(da_svd(weight, sigma, rank).factors), sigma)
            <= sigma_error(weight, reconstruct(truncated_svd(weight, rank).factors), sigma) + 1e-12
        )
    for ranks in ((4, 3), (10, 6)):
        da = da_tucker2(weight, sigma, ranks)
        frob = tucker2_hooi(weight, ranks)
        assert (
            sigma_error(weight, reconstruct(da.factors), sigma)
            <= sigma_error(weight, reconstruct(frob.factors), sigma) + 1e-9
        )
        assert all(b <= a * (1 + 1e-12) + 1e-15 for a, b in zip(da.history, da.history[1:]))
    for rank in (3, 12):
        da = da_cp(weight, sigma, rank, max_iter=60)
        frob = cp_als(weight, rank)
        assert (
            sigma_error(weight, reconstruct(da.factors), sigma)
            <= sigma_error(weight, reconstruct(frob.factors), sigma) + 1e-6
        )
        assert all(b <= a + 1e-8 for a, b in zip(da.history, da.history[1:]))


def test_da_svd_matches_brute_force_optimum():
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((4, 6))
    sigma = anisotropic_sigma(6, rng)
    result = da_svd(weight.reshape(4, 6, 1, 1), sigma, 2)

    def objective(flat):
        a, b = flat[:8].reshape(4, 2), flat[8:].reshape(2, 6)
        return sigma_error(weight, a @ b, sigma)

    best = min(
        scipy.optimize.minimize(objective, rng.standard_normal(20), method="BFGS", options={"gtol": 1e-10}).fun
        for _ in range(8)
    )
    assert result.rel_error == pytest.approx(best, abs=1e-7)
    # and the textbook form: best rank-2 approximation of W L, mapped back with L^-1
    factor = np.linalg.cholesky(sigma)
    u, s, vt = np.linalg.svd(weight @ factor)
    textbook = (u[:, :2] * s[:2]) @ vt[:2] @ np.linalg.inv(factor)
    np.testing.assert_allclose(reconstruct(result.factors).reshape(4, 6), textbook, atol=1e-8)


def test_matrix_free_cg_path_matches_direct_solve():
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((12, 10, 3, 3))
    sigma = anisotropic_sigma(90, rng)
    direct = da_tucker2(weight, sigma, (6, 5), max_iter=15, tol=0)
    iterative = da_tucker2(weight, sigma, (6, 5), max_iter=15, tol=0, direct_limit=0, cg_iter=200)
    np.testing.assert_allclose(iterative.history, direct.history, rtol=1e-6)
    direct = da_cp(weight, sigma, 5, max_iter=15, tol=0)
    iterative = da_cp(weight, sigma, 5, max_iter=15, tol=0, direct_limit=0, cg_iter=200)
    np.testing.assert_allclose(iterative.history, direct.history, rtol=1e-6)


def test_seeded_runs_are_identical():
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((8, 6, 3, 3))
    sigma = anisotropic_sigma(54, rng)
    first = da_tucker2(weight, sigma, (3, 3), init="random", seed=1)
    again = da_tucker2(weight, sigma, (3, 3), init="random", seed=1)
    other = da_tucker2(weight, sigma, (3, 3), init="random", seed=2, max_iter=1)
    assert np.array_equal(first.factors.core, again.factors.core)
    assert not np.array_equal(first.factors.core, other.factors.core)
    first, again = (da_cp(weight, sigma, 4, init="random", seed=3, max_iter=20) for _ in range(2))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            (first.factors.input_factor, first.factors.output_factor, *first.factors.spatial_factors),
            (again.factors.input_factor, again.factors.output_factor, *again.factors.spatial_factors),
        )
    )


def test_whitening_is_robust_to_rank_deficient_and_badly_scaled_sigma():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 10)) * 1e-9  # rank 3 of 10, tiny scale
    sigma = x.T @ x
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(sigma)  # what a bare Cholesky does
    white = whiten(sigma)
    assert np.isfinite(white.factor).all() and white.eigenvalues.min() > 0
    np.testing.assert_allclose(white.factor @ white.factor.T, sigma, atol=1e-5 * np.abs(sigma).max())
    np.testing.assert_allclose(white.inverse_factor @ white.covariance @ white.inverse_factor.T, np.eye(10), atol=1e-6)
    np.linalg.cholesky(regularize(sigma))  # positive definite
    weight = rng.standard_normal((5, 10, 1, 1))
    for result in (da_tucker2(weight, sigma, (3, 3)), da_cp(weight, sigma, 3), da_svd(weight, sigma, 3)):
        # the input only spans 3 directions, so rank 3 fits the output up to the eigenvalue floor
        assert np.isfinite(result.rel_error) and result.rel_error < 1e-4
    zero = da_tucker2(weight, np.zeros((10, 10)), (2, 2))  # a dead layer: no input ever
    assert np.isfinite(reconstruct(zero.factors)).all()


def test_bias_refit_against_samples():
    rng = np.random.default_rng(12)
    samples = rng.standard_normal((5000, 18)) @ rng.standard_normal((18, 18)) + rng.standard_normal(18) * 2
    weight, bias = rng.standard_normal((6, 2, 3, 3)), rng.standard_normal(6)
    sigma, mean = samples.T @ samples / len(samples), samples.mean(0)
    plain = reconstruct(da_svd(weight, sigma, 2).factors).reshape(6, 18)
    centered = reconstruct(da_svd(weight, centered_covariance(sigma, mean), 2).factors).reshape(6, 18)
    refitted = refit_bias(bias, weight, centered, mean)
    original = samples @ weight.reshape(6, 18).T + bias
    error_plain = np.mean(np.sum((original - (samples @ plain.T + bias)) ** 2, 1))
    error_refit = np.mean(np.sum((original - (samples @ centered.T + refitted)) ** 2, 1))
    assert error_refit < error_plain
    assert np.allclose((original - (samples @ centered.T + refitted)).mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(refit_bias(None, weight, centered, mean), refitted - bias)


def test_callback_and_bad_ranks():
    rng = np.random.default_rng(13)
    weight = rng.standard_normal((6, 4, 3, 3))
    sigma = anisotropic_sigma(36, rng)
    seen = []
    result = da_tucker2(weight, sigma, (2, 2), callback=lambda sweep, error: seen.append((sweep, error)))
    assert [s for s, _ in seen] == list(range(result.iterations + 1)) and [e for _, e in seen] == list(result.history)
    with pytest.raises(ValueError, match="ranks"):
        da_tucker2(weight, sigma, (7, 2))
    with pytest.raises(ValueError, match="rank"):
        da_svd(weight, sigma, 0)


def test_the_weight_shape_of_factors_is_their_reconstruction_s_and_mismatched_factors_are_refused():
    """`weight_shape` (what the rewrite checks) against `reconstruct` on every container, 1-D to 3-D kernels."""
    rng = np.random.default_rng(8)
    for kernel in ((3,), (3, 2), (1, 1), (2, 3, 2)):
        containers = [
            SVDFactors(rng.standard_normal((4, 5, *kernel)), rng.standard_normal((6, 4))),
            Tucker2Factors(rng.standard_normal((5, 3)), rng.standard_normal((2, 3, *kernel)),
                           rng.standard_normal((6, 2))),
            CPFactors(rng.standard_normal((5, 4)), tuple(rng.standard_normal((k, 4)) for k in kernel),
                      rng.standard_normal((6, 4))),
            ChannelFactors(np.array([0, 2, 3]), rng.standard_normal((6, 3, *kernel)), 5),
        ]  # fmt: skip
        for factors in containers:
            assert weight_shape(factors) == reconstruct(factors).shape == (6, 5, *kernel)
    bad = [
        SVDFactors(rng.standard_normal((4, 5, 3, 3)), rng.standard_normal((6, 3))),
        Tucker2Factors(rng.standard_normal((5, 3)), rng.standard_normal((2, 4, 3, 3)), rng.standard_normal((6, 2))),
        Tucker2Factors(rng.standard_normal((5, 3)), rng.standard_normal((2, 3, 3, 3)), rng.standard_normal((6, 4))),
        CPFactors(rng.standard_normal((5, 4)), (rng.standard_normal((3, 4)), rng.standard_normal((3, 2))),
                  rng.standard_normal((6, 4))),
        ChannelFactors(np.array([0, 2]), rng.standard_normal((6, 3, 3, 3)), 5),
    ]  # fmt: skip
    for factors in bad:
        with pytest.raises(ValueError, match="inner dimensions|input factor of rank"):
            weight_shape(factors)
