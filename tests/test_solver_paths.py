"""The fast solver paths against reference computations at the same ranks: MTTKRP by successive contractions
against the explicit Khatri-Rao unfolding, and the CG input steps against exact (dense) solves, on planted
and real layers. No layer may fit more than 1 % worse (relative) than the reference."""

import numpy as np
import pytest
from builders import SHARED
from test_decompose import anisotropic_sigma, planted_cp, planted_tucker

from onnx_dacomp.decompose.cp import _initial_factors, _normalized, cp_als, da_cp
from onnx_dacomp.decompose.tucker2 import da_tucker2, weighted_input_factor

EXACT = 10**9  # a direct-solve limit no layer reaches: every input step is an exact dense solve
TOLERANCE = 1.01


def reference_cp_als(weight, rank, sweeps):
    """Textbook CP-ALS: each mode from the unfolding times the explicit Khatri-Rao product of the others."""
    tensor = np.asarray(weight, np.float64)
    modes = [None, *_initial_factors(tensor, rank, "svd", 0)]

    def khatri_rao(factors):
        result = factors[0]
        for factor in factors[1:]:
            result = np.einsum("ir,jr->ijr", result, factor).reshape(-1, rank)
        return result

    def solve(mode):
        others = [m for m in range(tensor.ndim) if m != mode]
        unfolding = np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)
        gram = np.prod([modes[m].T @ modes[m] for m in others], axis=0)
        gram = gram + 1e-9 * np.mean(np.diag(gram)) * np.eye(rank)
        return np.linalg.solve(gram, (unfolding @ khatri_rao([modes[m] for m in others])).T).T

    modes[0] = solve(0)
    for _ in range(sweeps):
        for mode in range(1, tensor.ndim):
            modes[mode], modes[0] = _normalized(solve(mode), modes[0])
        modes[0] = solve(0)
    approximation = np.einsum("tr,sr,hr,wr->tshw", *modes)
    return float(np.sum((tensor - approximation) ** 2) / np.sum(tensor**2))


@pytest.mark.parametrize("shape,rank", [((12, 10, 3, 3), 7), ((8, 16, 3, 1), 20), ((16, 6, 2, 3), 30)])
def test_cp_als_contractions_give_the_textbook_iterates(shape, rank):
    rng = np.random.default_rng(rank)
    weight = planted_cp(rng, shape, max(2, rank // 3)) + 0.1 * rng.standard_normal(shape)
    fast = cp_als(weight, rank, max_iter=15, tol=0.0)
    assert fast.iterations == 15
    assert fast.rel_error == pytest.approx(reference_cp_als(weight, rank, 15), rel=1e-6, abs=1e-12)


def _layers():
    """(weight, Sigma) pairs: planted low-rank-plus-noise weights with anisotropic, rank-deficient Sigma."""
    rng = np.random.default_rng(7)
    cases = []
    for shape, samples in (((24, 20, 3, 3), None), ((32, 24, 3, 3), 120), ((16, 40, 3, 3), None)):
        weight = planted_tucker(rng, shape, (8, 8)) + 0.2 * rng.standard_normal(shape)
        cases.append((weight, anisotropic_sigma(shape[1] * 9, rng, samples)))
    return cases


def _compare(weight, sigma, tucker_ranks, cp_rank, sweeps=30):
    start = weighted_input_factor(weight, sigma)[:, : tucker_ranks[1]]
    fast = da_tucker2(weight, sigma, tucker_ranks, init=start, max_iter=sweeps)
    exact = da_tucker2(weight, sigma, tucker_ranks, init=start, max_iter=sweeps, direct_limit=EXACT)
    assert fast.rel_error <= exact.rel_error * TOLERANCE
    assert all(b <= a * (1 + 1e-9) for a, b in zip(fast.history, fast.history[1:]))  # still monotone
    fast = da_cp(weight, sigma, cp_rank, max_iter=sweeps)
    exact = da_cp(weight, sigma, cp_rank, max_iter=sweeps, direct_limit=EXACT)
    assert fast.rel_error <= exact.rel_error * TOLERANCE


@pytest.mark.parametrize("case", range(3))
def test_cg_input_steps_fit_as_well_as_exact_solves_on_planted_layers(case):
    weight, sigma = _layers()[case]
    t, s = weight.shape[:2]
    _compare(weight, sigma, (t // 2, s // 2), s)


def test_cg_input_steps_fit_as_well_as_exact_solves_on_real_layers(cifar_train):
    from onnx_dacomp.calibration.collect import collect_statistics
    from onnx_dacomp.calibration.sources import ImageFolderSource, ImagePreprocessing
    from onnx_dacomp.load import load_model
    from onnx_dacomp.targets import find_targets, read_weights

    path = SHARED / "models" / "cifar10_resnet20.onnx"
    if not path.is_file():
        pytest.skip("../shared/models is absent")
    model = load_model(path)
    layers = [layer for layer in find_targets(model).targets if layer.geometry.kernel == (3, 3)]
    chosen = [layers[2], layers[9]]  # 16 and 32 channels (exact dense solves of 64-channel layers take minutes)
    pre = ImagePreprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    source = ImageFolderSource(cifar_train, "input", (1, 3, 32, 32), pre, limit=128)
    statistics = collect_statistics(model, chosen, source, device="cpu", progress=False)
    weights = read_weights(model, chosen)
    for layer in chosen:
        t, s = layer.out_channels, layer.in_channels
        _compare(
            weights[layer.name].astype(np.float64), statistics.layers[layer.name].covariance[0], (t // 2, s // 2), s
        )
