"""Channel pruning: the greedy selection against least squares on samples and brute force, the Gather removal
against onnxruntime outputs of the unchanged graph, and the budget's accounting against the written model."""

import itertools

import numpy as np
import pytest
from builders import IR_VERSION
from onnx import TensorProto, helper, numpy_helper

import onnx_dacomp
from onnx_dacomp.channels import shrink_producers
from onnx_dacomp.decompose.channels import channel_order, held_out_errors, refit_on_channels
from onnx_dacomp.errors import UserError
from onnx_dacomp.methods import get, prune
from onnx_dacomp.runtime import create_session


def _samples(count, dims, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, dims)) @ rng.standard_normal((dims, dims)) * 0.5 + rng.standard_normal(dims)


@pytest.mark.parametrize("kernel, channels", [((), 12), ((3, 3), 6)])
def test_channel_order_errors_are_those_of_least_squares_refits_on_the_samples(kernel, channels):
    out_channels, taps = 5, int(np.prod(kernel, dtype=int))
    x = _samples(3000, channels * taps)
    weight = np.random.default_rng(1).standard_normal((out_channels, channels, *kernel))
    y = x @ weight.reshape(out_channels, -1).T
    order = channel_order(weight, x.T @ x / len(x))
    assert sorted(order.channels) == list(range(channels))

    def least_squares_error(kept):
        columns = (np.asarray(kept)[:, None] * taps + np.arange(taps)).ravel()
        fit = np.linalg.lstsq(x[:, columns], y, rcond=None)[0]
        return np.sum((x[:, columns] @ fit - y) ** 2) / np.sum(y**2), columns

    for count in range(1, channels + 1):
        kept = np.sort(order.channels[:count])
        error, columns = least_squares_error(kept)
        refit = refit_on_channels(weight, x.T @ x / len(x), kept).reshape(out_channels, -1)
        assert order.errors[count - 1] == pytest.approx(error, rel=1e-5, abs=1e-9)
        assert np.sum((x[:, columns] @ refit.T - y) ** 2) / np.sum(y**2) == pytest.approx(error, rel=1e-5, abs=1e-9)
        if count < channels:  # each step takes the channel whose addition leaves the least error
            remaining = [c for c in range(channels) if c not in kept]
            best = min(remaining, key=lambda c: least_squares_error([*kept, c])[0])
            assert (
                least_squares_error([*kept, order.channels[count]])[0] <= least_squares_error([*kept, best])[0] + 1e-9
            )
    # the first channel taken is the best single one; all channels kept give the layer itself
    assert order.errors[0] == pytest.approx(min(least_squares_error([c])[0] for c in range(channels)), rel=1e-6)
    assert order.errors[-1] == 0.0
    pairs = [least_squares_error(list(pair))[0] for pair in itertools.combinations(range(channels), 2)]
    assert order.errors[1] <= 1.25 * min(pairs)  # greedy: near the best pair, never better than it
    assert order.errors[1] >= min(pairs) - 1e-9


@pytest.mark.parametrize("kernel, ridge", [((), 0.1), ((2, 2), 0.1), ((2, 2), 0.0)])
def test_held_out_errors_are_those_of_the_refits_on_other_samples(kernel, ridge):
    """A layer fitted from few vectors (40 in 24 channels): each refit's error on other samples, computed here
    (also for a conv, and from a singular covariance, which the refits regularize)."""
    channels, taps = 24, int(np.prod(kernel, dtype=int))
    x = _samples(1040, channels * taps, seed=2)
    fit, other = x[:40], x[40:]
    weight = np.random.default_rng(3).standard_normal((7, channels, *kernel))
    sigma = fit.T @ fit / len(fit) + ridge * np.eye(channels * taps)  # a ridge, as a shrunk estimate would be
    counts = list(range(1, channels + 1))
    errors = held_out_errors(weight, sigma, other.T @ other / len(other), counts)
    order = channel_order(weight, sigma)
    y = other @ weight.reshape(len(weight), -1).T
    for count, error in zip(counts, errors):
        kept = np.sort(order.channels[:count])
        columns = (kept[:, None] * taps + np.arange(taps)).ravel()
        refit = refit_on_channels(weight, sigma, kept).reshape(len(weight), -1)
        expected = np.sum((other[:, columns] @ refit.T - y) ** 2) / np.sum(y**2)
        assert error == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert errors[3] > order.errors[3]  # worse than the in-sample estimate: what the held-out figure is for
    assert errors[-1] == 0.0


def test_a_layers_channel_order_is_computed_once_for_its_estimates_and_fit(monkeypatch):
    """The table's estimate, the held-out estimate and the fit of one layer share its greedy order (computed
    once per process); another layer's arrays get their own."""
    calls = []
    monkeypatch.setattr(prune, "channel_order", lambda *args: calls.append(1) or channel_order(*args))
    monkeypatch.setattr(prune, "_ORDERS", {})
    method = get("prune")
    x = _samples(400, 8, seed=4)
    weight, sigma = np.random.default_rng(5).standard_normal((3, 8)), x.T @ x / len(x)
    estimates = method.estimate(weight, sigma, [(2,), (5,)], seed=0)
    method.estimate_held_out(weight, sigma, sigma, [(2,)], seed=0)
    fit = method.solve(weight, sigma, (5,), max_iter=1, seed=0)
    assert len(calls) == 1
    assert fit.rel_error == estimates[1]
    method.solve(weight + 1.0, sigma, (5,), max_iter=1, seed=0)
    assert len(calls) == 2


def _model(nodes, inits, channels_last=False, input_channels=4):
    shape = ["n", 5, 5, input_channels] if channels_last else ["n", input_channels, 5, 5]
    graph = helper.make_graph(
        nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def _array(rng, *shape, name):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _mlp(rng, extra_reader=False):
    """Channels-last MLP: MatMul + bias, GELU written out with Constant nodes, a Gather of 5 of its 12 hidden
    units, MatMul (ConvNeXt's block as PyTorch exports it)."""
    consts = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(np.array(v, np.float32), n))
              for n, v in (("sqrt2", 1.4142135), ("one", 1.0), ("half", 0.5))]  # fmt: skip
    nodes = [
        *consts,
        helper.make_node("MatMul", ["x", "w1"], ["m"], name="expand"),
        helper.make_node("Add", ["b1", "m"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h", "e1"], ["g0"]),
        helper.make_node("Mul", ["g0", "half"], ["g1"]),
        helper.make_node("Mul", ["g1", "scale"], ["g"]),  # a per-channel constant: sliced too
        helper.make_node("Gather", ["g", "kept"], ["s"], axis=3),
        helper.make_node("MatMul", ["s", "w2"], ["y"], name="project"),
    ]
    kept = numpy_helper.from_array(np.array([7, 0, 3, 11, 5], np.int64), "kept")
    inits = [_array(rng, 4, 12, name="w1"), _array(rng, 12, name="b1"), _array(rng, 12, name="scale"),
             _array(rng, 5, 3, name="w2"), kept]  # fmt: skip
    if extra_reader:  # the activation also leaves the graph: it needs every channel
        nodes.append(helper.make_node("ReduceSum", ["g"], ["other"], keepdims=0))
    model = _model(nodes, inits, channels_last=True)
    if extra_reader:
        model.graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, None))
    return model


def _convs(rng):
    """Conv -> BatchNorm -> Relu -> depthwise Conv (bias) -> Clip -> Gather of 3 of 6 channels -> Conv."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="expand", kernel_shape=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Conv", ["r", "dw", "dwb"], ["d"], group=6, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["d", "lo", "hi"], ["a"]),
        helper.make_node("Gather", ["a", "kept"], ["s"], axis=1),
        helper.make_node("Conv", ["s", "w2"], ["y"], name="project", kernel_shape=[3, 3]),
    ]
    inits = [
        _array(rng, 6, 4, 1, 1, name="w1"), _array(rng, 6, name="b1"), _array(rng, 6, name="bn_s"),
        _array(rng, 6, name="bn_b"), _array(rng, 6, name="bn_m"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 6).astype(np.float32), "bn_v"),
        _array(rng, 6, 1, 3, 3, name="dw"), _array(rng, 6, name="dwb"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        numpy_helper.from_array(np.array([4, 1, 2], np.int64), "kept"), _array(rng, 2, 3, 3, 3, name="w2"),
    ]  # fmt: skip
    return _model(nodes, inits)


def _outputs(model, x):
    return create_session(model, "cpu").run(None, {"x": x})


@pytest.mark.parametrize(
    "build, shape, sliced, along",
    [(_mlp, (2, 5, 5, 4), ("w1", 5), {}), (_convs, (2, 4, 5, 5), ("w1", 3), {"d": "expand"})],
)
def test_shrinking_producers_removes_the_gather_and_keeps_the_function(build, shape, sliced, along):
    model = build(np.random.default_rng(0))
    before = model.SerializeToString()
    result = shrink_producers(model)
    assert model.SerializeToString() == before  # the input model is not changed
    assert result.shrunk == ("expand",) and result.along == along  # the depthwise conv sliced with `expand`
    assert not [node for node in result.model.graph.node if node.op_type == "Gather"]
    weights = {init.name.split("_pruned")[0]: numpy_helper.to_array(init) for init in result.model.graph.initializer}
    name, count = sliced
    assert count in weights[name].shape
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(_outputs(result.model, x)[0], _outputs(model, x)[0], rtol=1e-5, atol=1e-5)


def test_a_region_read_elsewhere_keeps_its_gather():
    model = _mlp(np.random.default_rng(0), extra_reader=True)
    result = shrink_producers(model)
    assert result.shrunk == () and result.model is model


def test_pruned_model_budget_counts_the_producers_it_slices(tmp_path):
    """Conv -> Relu -> Conv -> Relu -> Conv: the last conv pruned and the one computing its input sliced with it
    (not pruned itself). The report's rows are the written model's weights, its totals meet the ratio, and the
    whole model's output error is the one verified."""
    rng = np.random.default_rng(3)
    inits, nodes, current, width = [], [], "x", 4
    for index, out in enumerate((16, 16, 8)):
        inits += [_array(rng, out, width, 3, 3, name=f"w{index}"), _array(rng, out, name=f"b{index}")]
        nodes += [
            helper.make_node("Conv", [current, f"w{index}", f"b{index}"], [f"c{index}"], name=f"conv{index}",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{index}"], ["y" if index == 2 else f"r{index}"]),
        ]  # fmt: skip
        current, width = f"r{index}", out
    model = _model(nodes, inits)
    images = (rng.standard_normal((160, 4, 5, 5)) * 0.5 + rng.standard_normal((160, 4, 1, 1))).astype(np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, x=images)
    result = onnx_dacomp.compress(
        model, str(path), method="prune", ratio=0.6, holdout=32, rank_multiple=1, progress=False, benchmark=False,
        compensate="none",
    )  # fmt: skip
    report = result.report
    rows = {row.name: row for row in report.layers}
    assert rows["conv2"].method == "prune" and rows["conv1"].method is None
    assert rows["conv1"].reason == f"computes only the {rows['conv2'].ranks[0]} channels conv2 reads"
    weights = {n.name: n.input[1] for n in result.model.graph.node if n.op_type == "Conv"}
    sizes = {init.name: int(np.prod(init.dims)) for init in result.model.graph.initializer}
    for name, row in rows.items():
        if row.method is None:  # kept, or sliced to the channels the pruned layer reads
            node = next(n for n in result.model.graph.node if n.name == name)
            assert row.params_after == sizes[node.input[1]] + sizes[node.input[2]]
    total = sum(sizes[init] for init in sizes)
    assert report.totals["params_after"] == total
    assert report.totals["params_after"] <= 0.6 * report.totals["params_before"]
    assert not [node for node in result.model.graph.node if node.op_type == "Gather"]
    assert len(weights) == 3  # every conv is still one Conv
    held_out = images[np.random.default_rng(0).permutation(160)[:32]]
    reference = _outputs(model, held_out)[0].astype(np.float64)
    error = np.sum((_outputs(result.model, held_out)[0] - reference) ** 2) / np.sum(reference**2)
    assert report.verification.rel_output_error == pytest.approx(np.sqrt(error), rel=1e-4)


def test_the_rows_of_depthwise_convs_sliced_with_a_producer_are_the_written_weights(tmp_path):
    """Conv 1x1 -> Relu -> depthwise 3x3 -> Relu -> Conv 1x1, the last pruned: the depthwise conv computes only
    the channels kept too, and its row (not counted in the budget) says so with the written model's weights."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="expand", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "dw", "dwb"], ["c1"], name="depthwise", group=16, kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="project", kernel_shape=[1, 1]),
    ]  # fmt: skip
    inits = [_array(rng, 16, 4, 1, 1, name="w0"), _array(rng, 16, name="b0"), _array(rng, 16, 1, 3, 3, name="dw"),
             _array(rng, 16, name="dwb"), _array(rng, 8, 16, 1, 1, name="w2"), _array(rng, 8, name="b2")]  # fmt: skip
    model = _model(nodes, inits)
    images = (rng.standard_normal((160, 4, 5, 5)) * 0.5 + rng.standard_normal((160, 4, 1, 1))).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=images)
    result = onnx_dacomp.compress(
        model, str(tmp_path / "data.npz"), method="prune", ratio=0.6, holdout=32, rank_multiple=1, progress=False,
        benchmark=False, compensate="none",
    )  # fmt: skip
    rows = {row.name: row for row in result.report.layers}
    kept = rows["project"].ranks[0]
    assert rows["project"].method == "prune" and kept < 16
    sizes = {init.name: int(np.prod(init.dims)) for init in result.model.graph.initializer}
    depthwise = next(node for node in result.model.graph.node if node.name == "depthwise")
    assert rows["depthwise"].params_after == sizes[depthwise.input[1]] + sizes[depthwise.input[2]] == 10 * kept
    assert rows["depthwise"].macs_after == 9 * kept * 25 and rows["depthwise"].params_before == 160
    assert rows["depthwise"].reason.endswith(f"; computes only the {kept} channels project reads")
    assert not rows["depthwise"].counted
    assert result.report.totals["params_before"] == rows["expand"].params_before + rows["project"].params_before


def test_a_pruned_layer_costs_its_producers_share_and_its_time_in_proportion():
    """LayerCosts with a pruned layer coupled to the layer computing its input: its original cost holds both,
    the producer's none on its own; a candidate keeping R of S channels costs its own chain plus R/S of the
    producer (weights, bias, MACs) and R/S of both layers' times (no Gather runs in the written model)."""
    from onnx_dacomp.geometry import original_cost
    from onnx_dacomp.speed import LayerCosts
    from onnx_dacomp.targets import find_targets

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="expand", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="project", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    inits = [_array(rng, 16, 4, 1, 1, name="w1"), _array(rng, 16, name="b1"), _array(rng, 8, 16, 3, 3, name="w2")]
    scan = find_targets(_model(nodes, inits), {"x": (1, 4, 5, 5)})
    layers = {layer.name: layer for layer in scan.layers}

    class Timing:  # fixed one-layer times (ms)
        def original(self, layer):
            return {"expand": 2.0, "project": 6.0}[layer.name]

    costs = LayerCosts(layers, Timing(), {"project": ("expand",)})
    expand, project = (original_cost(layers[name].geometry) for name in ("expand", "project"))
    assert costs.original("expand") == (0, 0, 0)
    assert costs.original("project") == (expand.params + project.params, expand.macs + project.macs, 8.0)
    params, macs, latency = costs.chain("project", "prune", (4,))
    assert params == 8 * 4 * 9 + (4 * 4 + 4)  # the pruned conv, and 4 of the 16 output channels of expand
    assert macs == 25 * (8 * 4 * 9 + 4 * 4)
    assert latency == pytest.approx((6.0 + 2.0) * 4 / 16)


def test_auto_allocates_a_pruned_layer_together_with_the_layers_computing_its_input():
    """A group (c, whose input channels p computes) and a lone layer q at 0.6 of 200 parameters. Pruning c
    (its cost holds p's sliced share) is the cheapest error while its measured weight is low: c pruned, p and q
    kept. Probed pruned at 100 times the weight, c and p get chains of their own (the least weighted error of
    the combinations that fit: c at 60, p at 20, q at 30, error 0.4), and nothing is pruned."""
    from onnx_dacomp.geometry import Cost
    from onnx_dacomp.ranks.allocate import allocate
    from onnx_dacomp.ranks.candidates import Candidate, CandidateTable
    from onnx_dacomp.ranks.plan import sliced

    def table(name, original, *options):
        candidates = tuple(Candidate(m, (r,), Cost(cost, cost), error) for m, r, cost, error in options)
        return CandidateTable(name, Cost(original, original), candidates)

    tables = [
        table("c", 100, ("svd", 6, 60, 0.2), ("svd", 3, 30, 0.5), ("prune", 8, 50, 0.05), ("prune", 4, 25, 0.3)),
        table("p", 40, ("svd", 2, 20, 0.1)),
        table("q", 60, ("svd", 3, 30, 0.1)),
    ]
    groups = {"c": ("p",)}
    low = allocate(tables, "params", 120, 0, {}, groups, {"c": 1.0})
    assert (low["c"].method, low["c"].cost.params, low["p"], low["q"]) == ("prune", 50, None, None)
    assert sliced(low, groups) == {"p"}  # its cost is in c's: 50 + q's 60 = 110 <= 120
    high = allocate(tables, "params", 120, 0, {}, groups, {"c": 100.0})
    assert {name: choice.cost.params for name, choice in high.items()} == {"c": 60, "p": 20, "q": 30}
    assert sliced(high, groups) == set()


def _three_convs(rng):
    """conv0 -> Relu -> conv1 -> Relu -> conv2 -> Relu on 4x5x5 inputs, conv1's 16 output channels 8 channels twice."""
    w1 = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    inits = [
        _array(rng, 16, 4, 3, 3, name="w0"), _array(rng, 16, name="b0"),
        numpy_helper.from_array(np.concatenate([w1, w1]), "w1"),
        numpy_helper.from_array(np.concatenate([b1, b1]), "b1"),
        _array(rng, 8, 16, 3, 3, name="w2"), _array(rng, 8, name="b2"),
    ]  # fmt: skip
    nodes, current = [], "x"
    for index in range(3):
        nodes += [
            helper.make_node("Conv", [current, f"w{index}", f"b{index}"], [f"c{index}"], name=f"conv{index}",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{index}"], ["y" if index == 2 else f"r{index}"]),
        ]  # fmt: skip
        current = f"r{index}"
    return _model(nodes, inits)


def test_a_layer_pruned_by_ranks_counts_the_producer_it_slices_once():
    """`--ranks` prunes c, whose cost holds the share of p that computes its input: p is then neither counted
    again nor given a chain of its own. At 0.6 of 200 parameters, c's 50 and q's 60 (110) already fit: q is
    kept; counting p's 40 again (150) would have compressed q and p as well."""
    from onnx_dacomp.geometry import Cost
    from onnx_dacomp.ranks.candidates import Candidate, CandidateTable
    from onnx_dacomp.ranks.plan import Budget, plan

    originals = {"c": 100, "p": 40, "q": 60}
    tables = {
        "p": CandidateTable("p", Cost(40, 40), (Candidate("svd", (2,), Cost(20, 20), 0.1),)),
        "q": CandidateTable("q", Cost(60, 60), (Candidate("svd", (3,), Cost(30, 30), 0.1),)),
    }
    pruned = Candidate("prune", (8,), Cost(50, 50), 0.05)
    rank_plan = plan(
        dict.fromkeys(originals), tables, Budget("params", 0.6, "allocated", "auto", 1, 0),
        original_costs={name: Cost(size, size) for name, size in originals.items()}, overrides={"c": pruned},
        groups={"c": ("p",)},
    )  # fmt: skip
    assert rank_plan.choices == {"c": pruned, "p": None, "q": None}


def test_a_layer_pruned_by_ranks_slices_its_producer_and_the_ratio_counts_it_once(tmp_path):
    """`--ranks` prunes conv2 to 8 of its 16 input channels at --ratio 0.6: conv1 then computes only those 8,
    and the model keeps 2336 of 4072 parameters (0.57), so conv0 stays as it is."""
    rng = np.random.default_rng(4)
    model = _three_convs(rng)
    path = tmp_path / "data.npz"
    np.savez(path, x=(rng.standard_normal((160, 4, 5, 5)) + rng.standard_normal((160, 4, 1, 1))).astype(np.float32))
    result = onnx_dacomp.compress(
        model, str(path), ratio=0.6, ranks={"conv2": {"method": "prune", "ranks": 8}}, holdout=32, rank_multiple=1,
        progress=False, benchmark=False, compensate="none",
    )  # fmt: skip
    rows = {row.name: row for row in result.report.layers}
    assert (rows["conv2"].method, list(rows["conv2"].ranks)) == ("prune", [8])
    assert rows["conv1"].method is None and rows["conv1"].reason.startswith("computes only the 8 channels")
    assert rows["conv0"].method is None
    sizes = {init.name: int(np.prod(init.dims)) for init in result.model.graph.initializer}
    assert result.report.totals["params_after"] == sum(sizes.values()) == 2336


def test_ranks_may_not_give_a_chain_to_a_layer_they_slice(tmp_path):
    """A layer that computes the input channels of a layer `--ranks` prunes computes only the channels kept:
    a chain of its own is a contradiction, refused in one line."""
    model = _three_convs(np.random.default_rng(4))
    path = tmp_path / "data.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((64, 4, 5, 5)).astype(np.float32))
    with pytest.raises(UserError, match="--ranks prunes the input channels of conv2, which conv1"):
        onnx_dacomp.compress(
            model, str(path), ranks={"conv2": {"method": "prune", "ranks": 8}, "conv1": [4, 4]},
            progress=False, benchmark=False,
        )  # fmt: skip


def test_auto_prunes_redundant_input_channels_and_counts_the_producer_it_slices(tmp_path):
    """conv0 -> Relu -> conv1 -> Relu -> conv2 where conv1's 16 output channels are 8 channels twice: conv2 and
    conv1 form a group, and `auto` at 0.6 prunes conv2 to the channels it needs (exact), slicing conv1. The
    report's rows are the written model's weights and its totals meet the ratio."""
    rng = np.random.default_rng(4)
    model = _three_convs(rng)
    images = (rng.standard_normal((160, 4, 5, 5)) * 0.5 + rng.standard_normal((160, 4, 1, 1))).astype(np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, x=images)
    result = onnx_dacomp.compress(
        model, str(path), ratio=0.6, holdout=32, rank_multiple=1, progress=False, benchmark=False, compensate="none"
    )
    rows = {row.name: row for row in result.report.layers}
    assert rows["conv2"].method == "prune" and rows["conv2"].ranks[0] <= 8
    assert rows["conv1"].method is None and rows["conv1"].reason.startswith("computes only the")
    assert rows["conv2"].rel_error < 1e-6  # the duplicated channels carry nothing new
    sizes = {init.name: int(np.prod(init.dims)) for init in result.model.graph.initializer}
    assert result.report.totals["params_after"] == sum(sizes.values())
    assert result.report.totals["params_after"] <= 0.6 * result.report.totals["params_before"]
    assert not [node for node in result.model.graph.node if node.op_type == "Gather"]
