"""Dense layers: Gemm and MatMul (+ Add) as a layer kind: discovery, statistics, exact chains at full rank for
every attribute variant, fp16, and the DA-SVD optimum against a brute-force (whitened) solution."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, relative_error, run
from onnx import helper, numpy_helper

import onnx_dacomp
from onnx_dacomp.calibration.collect import collect_statistics
from onnx_dacomp.decompose.svd import da_svd
from onnx_dacomp.targets import find_targets


def _model(nodes, x_shape, inits, dtype=np.float32, output="y"):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", elem, ["N", *x_shape[1:]])],
        [helper.make_tensor_value_info(output, elem, None)],
        [
            numpy_helper.from_array(np.asarray(v).astype(dtype) if v.dtype.kind == "f" else v, k)
            for k, v in inits.items()
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def gemm(trans_b=1, alpha=1.0, beta=1.0, bias="vector", dtype=np.float32, k=12, n=9, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n, k) if trans_b else (k, n))
    inits = {"W": weight}
    inputs = ["x", "W"]
    if bias is not None:
        inits["C"] = rng.standard_normal(n if bias == "vector" else (1, n))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    return _model([node], (1, k), inits, dtype)


def matmul(x_shape, bias=True, dtype=np.float32, n=10, seed=0):
    rng = np.random.default_rng(seed)
    k = x_shape[-1]
    inits = {"W": rng.standard_normal((k, n))}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m" if bias else "y"], name="proj")]
    if bias:
        inits["B"] = rng.standard_normal(n)
        nodes.append(helper.make_node("Add", ["m", "B"], ["y"], name="proj_bias"))
    return _model(nodes, x_shape, inits, dtype)


def _data(shape, count=48, dtype=np.float32, seed=1):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((shape[-1], shape[-1])) * np.logspace(0, -1.5, shape[-1])
    return (rng.standard_normal((count, *shape[1:])) @ mixing).astype(dtype)


VARIANTS = {
    "gemm transB=1": (lambda dt: gemm(1, dtype=dt), (1, 12)),
    "gemm transB=0, alpha, beta": (lambda dt: gemm(0, alpha=0.5, beta=2.0, dtype=dt), (1, 12)),
    "gemm without C": (lambda dt: gemm(1, bias=None, dtype=dt), (1, 12)),
    "gemm with C [1, N]": (lambda dt: gemm(0, bias="row", dtype=dt), (1, 12)),
    "matmul 2-D + Add": (lambda dt: matmul((1, 12), dtype=dt), (1, 12)),
    "matmul 3-D": (lambda dt: matmul((1, 5, 12), bias=False, dtype=dt), (1, 5, 12)),
    "matmul 4-D + Add": (lambda dt: matmul((1, 3, 4, 12), dtype=dt), (1, 3, 4, 12)),
}


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, 1e-5), (np.float16, 1e-2)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_rank_chains_reproduce_every_dense_variant(variant, dtype, tolerance):
    build, shape = VARIANTS[variant]
    model = build(dtype)
    (layer,) = find_targets(model).targets
    x = _data(shape, dtype=dtype)
    full = min(layer.out_features, layer.in_features)
    result = onnx_dacomp.compress(model, [{"x": x}], ratio=None, ranks={layer.name: full}, holdout=0, progress=False)
    assert [row.method for row in result.report.layers] == ["svd"]
    assert not any(node.op_type in ("Gemm",) for node in result.model.graph.node)
    assert relative_error(run(result.model, {"x": x})[0], run(model, {"x": x})[0]) < tolerance


def test_statistics_of_dense_layers_are_the_row_moments():
    model = matmul((1, 3, 4, 12))
    (layer,) = find_targets(model).targets
    x = _data((1, 3, 4, 12), count=20)
    rows = x.reshape(-1, 12).astype(np.float64)
    for mode in ("graph", "numpy"):
        moments = collect_statistics(model, [layer], [{"x": x[:7]}, {"x": x[7:]}], mode=mode, progress=False)
        got = moments.layers[layer.name]
        assert got.count == len(rows) == 20 * 12
        np.testing.assert_allclose(got.second[0], rows.T @ rows, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got.first[0], rows.sum(0), rtol=1e-5, atol=1e-4)


def test_da_svd_of_a_dense_layer_is_the_whitened_optimum():
    """Brute force: the best rank-R fit in the Sigma-norm is the truncated SVD of W L (Sigma = L L^T), mapped
    back; no inverse of Sigma in da_svd, so this is an independent computation."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((20, 15))
    samples = rng.standard_normal((400, 15)) @ (rng.standard_normal((15, 15)) * np.logspace(0, -2, 15))
    sigma = samples.T @ samples / len(samples)
    values, vectors = np.linalg.eigh(sigma)
    root = vectors * np.sqrt(values)
    for rank in (1, 4, 9):
        left, singular, _ = np.linalg.svd(weight @ root)
        best = float(np.sum(singular[rank:] ** 2) / np.sum(singular**2))
        assert da_svd(weight, sigma, rank).rel_error == pytest.approx(best, rel=1e-8, abs=1e-12)


def test_dense_layers_share_the_budget_with_the_convolutions():
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)), "head": rng.standard_normal((4 * 36, 64)) * 0.05}
    inits["shape"] = np.array([0, -1], np.int64)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "head"], ["features"], name="head"),
        helper.make_node("Transpose", ["features"], ["features_t"]),
        helper.make_node("MatMul", ["features", "features_t"], ["y"], name="scores"),  # two activations
    ]
    model = _model(nodes, (1, 3, 12, 12), inits)
    layers = {layer.name: layer for layer in find_targets(model).layers}
    assert set(layers) == {"conv", "head"}  # a product of two activations is no layer
    x = rng.standard_normal((200, 3, 12, 12)).astype(np.float32)  # more samples than the head's 144 inputs
    report = onnx_dacomp.compress(model, [{"x": x}], ratio=0.5, holdout=0, rank_multiple=1, progress=False).report
    rows = {row.name: row for row in report.layers}
    assert rows["head"].method == "svd" and report.totals["params_before"] == layers["conv"].params + 4 * 36 * 64
    assert report.ratio <= 0.5 + 1e-9
    # with fewer samples than the head's inputs the head is fitted in a shrunk moment and still counted
    few = onnx_dacomp.compress(model, [{"x": x[:100]}], ratio=0.5, holdout=0, rank_multiple=1, progress=False).report
    rows = {row.name: row for row in few.layers}
    assert rows["head"].method == "svd" and rows["head"].counted and rows["head"].shrinkage > 0
    assert (rows["head"].vectors, rows["head"].dims) == (100, 144) and not rows["conv"].shrinkage
    assert few.totals["params_before"] == report.totals["params_before"] and few.ratio <= 0.5 + 1e-9


def test_unsupported_dense_layers_are_listed_with_a_reason():
    rng = np.random.default_rng(0)
    transposed = helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transA=1)
    assert (
        "transA"
        in find_targets(_model([transposed], (1, 12), {"W": rng.standard_normal((12, 4))})).layers[0].skip_reason
    )
    batched = helper.make_node("MatMul", ["x", "W"], ["y"], name="batched")
    layer = find_targets(_model([batched], (1, 2, 5, 12), {"W": rng.standard_normal((2, 12, 4))})).layers[0]
    assert "batched weight of rank 3" in layer.skip_reason
    left = helper.make_node("MatMul", ["W", "x"], ["y"], name="left")
    layer = find_targets(_model([left], (1, 12, 3), {"W": rng.standard_normal((4, 12))})).layers[0]
    assert "left operand" in layer.skip_reason


def test_a_layer_with_fewer_calibration_vectors_than_dims_is_fitted_in_a_shrunk_second_moment():
    """30 vectors in 40 dims: a singular second moment. The layer is compressed all the same, in the OAS
    estimate (computed here from its published formula), and the report says how many vectors, dims and what
    weight; the fitted map is the best rank-r map in that estimate (its eigen-decomposition, here)."""
    model = matmul((1, 40), bias=False)  # one 40-dim vector per sample
    x = _data((1, 40), count=30).astype(np.float64)  # float32 values: the statistics' own
    few = onnx_dacomp.compress(
        model, [{"x": x.astype(np.float32)}], ratio=0.5, holdout=0, rank_multiple=1, progress=False
    )
    (row,) = few.report.layers
    assert row.method == "svd" and row.counted and (row.vectors, row.dims) == (30, 40)
    mean, p, n = x.mean(axis=0), 40, 30
    covariance = x.T @ x / n - np.outer(mean, mean)  # the mean is kept, the covariance around it shrunk
    trace, trace_square = np.trace(covariance), np.sum(covariance * covariance)
    weight = min(1.0, ((1 - 2 / p) * trace_square + trace**2) / ((n + 1 - 2 / p) * (trace_square - trace**2 / p)))
    assert row.shrinkage == pytest.approx(weight, rel=1e-6) and 0 < weight < 1
    shrunk = (1 - weight) * covariance + weight * trace / p * np.eye(p) + np.outer(mean, mean)
    values, vectors = np.linalg.eigh(shrunk)
    root, inverse_root = (vectors * values**0.5) @ vectors.T, (vectors / values**0.5) @ vectors.T
    W = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64).T  # (N, K)
    u, sigma, vt = np.linalg.svd(W @ root)
    rank = row.ranks[0]
    best = (u[:, :rank] * sigma[:rank]) @ vt[:rank] @ inverse_root  # the optimum in the shrunk moment
    probe = np.eye(40, dtype=np.float32)[:, None, :]
    fitted = np.concatenate([run(few.model, {"x": row_})[0] for row_ in probe]).reshape(40, -1).T  # (N, K)
    assert relative_error(fitted, best) < 1e-4
    assert "30 vectors / 40 dims, weight" in few.report.table()


def test_the_bundled_convnext_has_its_pointwise_layers_as_dense_targets_and_full_rank_reproduces_it():
    path = Path(__file__).resolve().parents[1] / "models" / "dacomp_cifar_convnext.onnx"
    model = onnx.load(path)
    layers = find_targets(model).layers
    dense = [layer for layer in layers if layer.kind == "dense"]
    assert len(dense) == 9 and all(layer.skip_reason is None for layer in dense)  # 8 pointwise MatMuls + classifier
    assert sum(layer.params for layer in dense) > 0.8 * sum(layer.params for layer in layers)
    x = np.random.default_rng(0).random((160, 3, 32, 32), dtype=np.float32)  # >= 128: the classifier's inputs
    full = {layer.name: min(layer.in_features, layer.out_features) for layer in dense}
    result = onnx_dacomp.compress(model, [{"input": x}], ratio=None, ranks=full, holdout=0, progress=False)
    assert sum(row.method == "svd" for row in result.report.layers) == 9
    assert sum(node.op_type in ("MatMul", "Gemm") for node in result.model.graph.node) == 18
    assert relative_error(run(result.model, {"input": x})[0], run(model, {"input": x})[0]) < 1e-4


@pytest.mark.parametrize("bias_refit", [False, True])
def test_a_shrunk_layer_has_its_errors_measured_on_the_held_out_vectors(tmp_path, bias_refit):
    """40 calibration vectors in 40 dims fit themselves far better than others: the shrunk layer's error (the
    report's, the allocation's estimate) is its output error on the held-out vectors, computed here from the
    vectors themselves and the written model (with the bias refit too, whose bias cancels the error's mean on
    the calibration vectors, not on the held-out ones)."""
    model = matmul((1, 40), bias=False)
    x = _data((1, 40), count=100, seed=3)
    calibration, held_out = x[:40], x[40:]
    np.savez(tmp_path / "held_out.npz", x=held_out)
    result = onnx_dacomp.compress(
        model, [{"x": calibration}], ratio=0.3, eval_data=str(tmp_path / "held_out.npz"), rank_multiple=1,
        progress=False, sensitivity=False, benchmark=False, bias_refit=bias_refit,
    )  # fmt: skip
    (row,) = result.report.layers
    assert row.shrinkage > 0 and row.held_out_vectors == 60
    W = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)  # (K, N)

    def output_error(vectors):
        reference = vectors.astype(np.float64) @ W
        return float(np.sum((run(result.model, {"x": vectors})[0] - reference) ** 2) / np.sum(reference**2))

    assert row.rel_error == pytest.approx(output_error(held_out), rel=1e-4)
    assert row.estimated_error == pytest.approx(row.rel_error, rel=1e-6)  # closed form: the fit's own error
    assert output_error(calibration) < 0.8 * row.rel_error  # what the calibration vectors alone would say
    assert "errors measured on 60 held-out vectors" in result.report.table()


def test_a_shrunk_layer_with_held_out_vectors_takes_the_shrinkage_weight_that_errs_least_on_them(tmp_path):
    """The shrinkage weight is chosen among OAS's and a grid by the held-out error of the fits at every rank,
    computed here from the vectors themselves (whitening, SVD, truncation, the error on each held-out vector);
    the written layer is the best map of the chosen rank in the moment shrunk by that weight."""
    model = matmul((1, 40), bias=False)
    x = _data((1, 40), count=100, seed=5)
    calibration, held_out = x[:30], x[30:]
    np.savez(tmp_path / "held_out.npz", x=held_out)
    result = onnx_dacomp.compress(
        model, [{"x": calibration}], ratio=0.3, eval_data=str(tmp_path / "held_out.npz"), rank_multiple=1,
        progress=False, sensitivity=False, benchmark=False,
    )  # fmt: skip
    (row,) = result.report.layers
    W = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64).T  # (N, K)
    fit, check = calibration.astype(np.float64), held_out.astype(np.float64)
    mean, p, n = fit.mean(axis=0), 40, len(fit)
    covariance = fit.T @ fit / n - np.outer(mean, mean)
    trace, trace_square = np.trace(covariance), np.sum(covariance * covariance)
    oas = min(1.0, ((1 - 2 / p) * trace_square + trace**2) / ((n + 1 - 2 / p) * (trace_square - trace**2 / p)))

    def best_map(weight, rank):
        values, vectors = np.linalg.eigh(
            (1 - weight) * covariance + weight * trace / p * np.eye(p) + np.outer(mean, mean)
        )
        root, inverse_root = (vectors * values**0.5) @ vectors.T, (vectors / values**0.5) @ vectors.T
        u, sigma, vt = np.linalg.svd(W @ root)
        return (u[:, :rank] * sigma[:rank]) @ vt[:rank] @ inverse_root

    def held_out_error(weight):
        errors = [np.sum(((W - best_map(weight, r)) @ check.T) ** 2) / np.sum((W @ check.T) ** 2) for r in range(1, 11)]
        return np.mean(errors)

    grid = (oas, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
    chosen = min(grid, key=held_out_error)
    assert chosen != oas and held_out_error(chosen) < held_out_error(oas)  # the choice matters here
    assert row.shrinkage == pytest.approx(chosen)
    probe = np.eye(40, dtype=np.float32)[:, None, :]
    fitted = np.concatenate([run(result.model, {"x": row_})[0] for row_ in probe]).reshape(40, -1).T  # (N, K)
    assert relative_error(fitted, best_map(chosen, row.ranks[0])) < 1e-4


def test_without_held_out_data_a_shrunk_layer_is_fitted_on_four_fifths_and_measured_on_the_rest(tmp_path):
    """--holdout 0: the layer fitted from few vectors takes a seeded fifth of the calibration samples out of
    its fit and measures its errors there (in-sample, EfficientNet-Lite0's classifier looked cheap and was
    compressed until half the top-1 was gone): its error is the written layer's output error on exactly those
    samples, computed here from them."""
    from onnx_dacomp.calibration.sources import ArraySource

    model = matmul((1, 40), bias=False)
    np.savez(tmp_path / "data.npz", x=_data((1, 40), count=50, seed=4))
    result = onnx_dacomp.compress(
        model, str(tmp_path / "data.npz"), ratio=0.3, holdout=0, rank_multiple=1, progress=False, benchmark=False,
        sensitivity=False,
    )  # fmt: skip
    (row,) = result.report.layers
    assert (row.vectors, row.held_out_vectors) == (40, 10) and row.shrinkage > 0
    unseen = np.concatenate([batch["x"] for batch in ArraySource(tmp_path / "data.npz", ["x"]).subset(0, 10)])
    W = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    reference = unseen.astype(np.float64) @ W
    error = np.sum((run(result.model, {"x": unseen})[0] - reference) ** 2) / np.sum(reference**2)
    assert row.rel_error == pytest.approx(error, rel=1e-4)
