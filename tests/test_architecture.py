"""The seams of the code: pure math modules, the method registry, configs as the only source of options,
picklable fit work, the rewrite's own checks and provenance."""

import ast
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import conv_stack, relative_error, run

import onnx_dacomp
from onnx_dacomp import methods
from onnx_dacomp.calibration.sources import ArraySource
from onnx_dacomp.cli import build_parser
from onnx_dacomp.cli.compress_command import config_from_args
from onnx_dacomp.config import GROUPS, CompressConfig, DataConfig, FitConfig, ImagePreprocessing, PlanConfig
from onnx_dacomp.decompose.factors import SVDFactors
from onnx_dacomp.errors import InternalError, UserError
from onnx_dacomp.fit import FitSettings, fit_all
from onnx_dacomp.layers.conv import ConvLayer
from onnx_dacomp.methods.svd import SVD
from onnx_dacomp.problems import build_problems
from onnx_dacomp.ranks.candidates import Candidate
from onnx_dacomp.rewrite import replace_layers
from onnx_dacomp.targets import find_targets, read_biases, read_weights
from onnx_dacomp.workers import Workers

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_dacomp"
MATH = {"decompose", "methods", "ranks", "geometry", "moments", "problems", "errors", "log"}


def _imports(path: Path):
    """(absolute roots, package-relative modules) imported by a file of the package."""
    roots, relative = set(), set()
    package = path.relative_to(PACKAGE).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1]
            target = (*base, *(node.module.split(".") if node.module else []))
            relative.add(target[0] if target else node.names[0].name)
    return roots, relative


def test_the_rank_math_imports_no_onnx():
    """methods/, ranks/ and the problem/geometry/moments types are numpy/scipy math: testable and reusable
    on arrays alone, and sendable to any worker."""
    allowed = {
        "numpy",
        "scipy",
        "__future__",
        "dataclasses",
        "collections",
        "math",
        "typing",
        "abc",
        "heapq",
        "itertools",
        "functools",
    }
    allowed.add("hashlib")  # LayerProblem.digest: the cache key
    files = [*PACKAGE.glob("methods/*.py"), *PACKAGE.glob("ranks/*.py")]
    files += [PACKAGE / f"{name}.py" for name in ("geometry", "moments", "problems")]
    for path in files:
        roots, relative = _imports(path)
        assert roots <= allowed | {"tqdm", "logging"}, f"{path.name} imports {roots - allowed}"
        assert relative <= MATH, f"{path.relative_to(PACKAGE)} imports {relative - MATH} of the package"


def test_method_names_are_only_compared_inside_the_registry():
    names = set(methods.METHODS)
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name in ("methods", "decompose"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                assert not names & set(constants), f"{path.relative_to(PACKAGE)}:{node.lineno} compares a method name"


def test_conv_layer_is_imported_only_by_conv_specific_code():
    for path in PACKAGE.rglob("*.py"):
        if "ConvLayer" in path.read_text():
            assert path.parent.name == "layers" and path.name.startswith("conv"), path


def test_a_registered_method_is_usable_end_to_end(tmp_path, monkeypatch):
    """Adding a method is one class and one registry line: here a copy of SVD with factors of its own type,
    picked by --ranks, fitted, costed, reported and written as its own chain."""

    class CopyFactors(SVDFactors):
        pass

    class Renamed(SVD):
        name = "svd_copy"
        factors_type = CopyFactors

        def solve(self, weight, sigma, ranks, *, max_iter, seed):
            result = super().solve(weight, sigma, ranks, max_iter=max_iter, seed=seed)
            return replace(result, factors=CopyFactors(result.factors.first, result.factors.last))

    monkeypatch.setitem(methods.METHODS, "svd_copy", Renamed())
    model = conv_stack(channels=8, size=(12, 12), input_channels=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3, 12, 12)).astype(np.float32)
    config = CompressConfig(ratio=None, ranks={"conv0": {"method": "svd_copy", "ranks": 8}}, holdout=0)
    result = onnx_dacomp.compress(model, [{"x": x}], config, progress=False)
    (row,) = result.report.compressed
    assert row.method == "svd_copy" and row.ranks == (8,)
    assert any("dacomp_svd_copy" in node.name for node in result.model.graph.node)
    # full rank: the chain computes the same function
    assert relative_error(run(result.model, {"x": x[:4]})[0], run(model, {"x": x[:4]})[0]) < 1e-5


def test_flat_options_go_to_their_group_and_unknown_ones_are_refused():
    config = CompressConfig(ratio=0.3, max_iter=7, holdout=5, seed=3, mean=(0.5, 0.5, 0.5), limit=9)
    assert config.plan.ratio == 0.3 and config.fit.max_iter == 7 and config.verify.holdout == 5
    assert config.runtime.seed == 3 and config.data.preprocessing.mean == (0.5, 0.5, 0.5)
    assert config.data.limit == 9
    assert config.replace(ratio=0.4).plan.ratio == 0.4 and config.replace(ratio=0.4).fit.max_iter == 7
    assert CompressConfig(fit=FitConfig(bias_refit=True), ratio=0.2).fit.bias_refit
    with pytest.raises(UserError, match="unknown option"):
        CompressConfig(ratoi=0.5)
    with pytest.raises(UserError, match="exclude each other"):
        CompressConfig(ratio=0.5, max_drop=1.0)
    # the budget ratio: the default unless exact ranks or an accuracy target replace it
    assert CompressConfig().plan.target_ratio == 0.5
    assert CompressConfig(ranks={"a": 3}).plan.target_ratio is None
    assert CompressConfig(min_agreement=0.9).plan.target_ratio is None


def test_the_cli_takes_its_options_and_defaults_from_the_configs():
    parser = build_parser()
    args = parser.parse_args(["compress", "m.onnx", "-o", "out.onnx"])
    assert config_from_args(args) == CompressConfig()
    compress_parser = next(action for action in parser._subparsers._group_actions if action.dest == "command").choices[
        "compress"
    ]
    options = {action.dest: action for action in compress_parser._actions}
    for cls in (*GROUPS.values(), ImagePreprocessing):
        for field in cls.__dataclass_fields__.values():
            if "help" not in field.metadata:
                continue
            assert field.name in options, f"no flag for {cls.__name__}.{field.name}"
    assert f"(default {FitConfig().max_iter})" in options["max_iter"].help
    assert "(default 500)" in options["holdout"].help
    args = parser.parse_args(["compress", "m.onnx", "-o", "o.onnx", "--scale", "1/255", "--bgr", "--max-iter", "3"])
    config = config_from_args(args)
    assert config.data.preprocessing.scale == pytest.approx(1 / 255)
    assert config.data.preprocessing.channel_order == "BGR" and config.fit.max_iter == 3
    assert config.data == DataConfig(preprocessing=ImagePreprocessing(channel_order="BGR"))
    assert config.plan == PlanConfig()


def test_fits_run_the_same_in_a_process_pool():
    """`fit_all(map=...)` is the seam for other executors: the work units pickle and give the same fits."""
    model = conv_stack(channels=8, size=(12, 12), input_channels=3)
    layers = list(find_targets(model).targets)
    problems = build_problems(layers, read_weights(model, layers), read_biases(model, layers), None)
    choices = {
        layers[0].name: Candidate("cp", (5,), None, 0.0),
        layers[1].name: Candidate("tucker2", (4, 3), None, 0.0),
        layers[2].name: Candidate("svd", (3,), None, 0.0),
    }
    settings = FitSettings(max_iter=5, seed=1)
    local = fit_all(problems, choices, settings, show_progress=False)
    with Workers(2) as pool:
        pooled = fit_all(problems, choices, settings, map=pool.map, show_progress=False)
    assert list(local) == list(pooled) == list(choices)
    for name in choices:
        for a, b in zip(local[name].factors, pooled[name].factors):
            for field in a.__dataclass_fields__:
                left, right = getattr(a, field), getattr(b, field)
                pairs = zip(left, right) if isinstance(left, tuple) else [(left, right)]
                assert all(np.array_equal(u, v) for u, v in pairs)


def test_the_rewrite_checks_its_result_and_names_what_it_replaced(monkeypatch):
    model = conv_stack(channels=8, size=(12, 12), input_channels=3)
    layer = find_targets(model).targets[0]
    weight = read_weights(model, [layer])[layer.name]
    factors = SVD().solve(weight, None, (8,), max_iter=0, seed=0).factors
    new = replace_layers(model, {layer.output: (layer, [factors])})
    chain = [node for node in new.graph.node if node.doc_string]
    assert len(chain) == 2 and all(layer.name in node.doc_string for node in chain)

    real = ConvLayer.chain_nodes

    def dangling(self, node, *args):
        nodes, initializers = real(self, node, *args)
        nodes[0].input[0] = "nowhere"  # a chain reading a tensor that does not exist
        return nodes, initializers

    monkeypatch.setattr(ConvLayer, "chain_nodes", dangling)
    with pytest.raises(InternalError, match="checker"):
        replace_layers(model, {layer.output: (layer, [factors])})


def test_output_records_provenance_and_kept_layers_say_why_under_a_search(tmp_path):
    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    model.metadata_props.add(key="author", value="someone")
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    base = rng.standard_normal((192, 3, 4, 4)).repeat(3, axis=2).repeat(3, axis=3)
    np.savez(path, x=(base + 0.05 * rng.standard_normal((192, 3, 12, 12))).astype(np.float32))
    config = CompressConfig(min_agreement=0.95, holdout=48, max_iter=5, method="svd", classifier_outputs=("r5",))
    result = onnx_dacomp.compress(model, ArraySource(path, ["x"]), config, progress=False)
    props = {prop.key: prop.value for prop in result.model.metadata_props}
    assert props["author"] == "someone" and props["onnx_dacomp.version"] == onnx_dacomp.__version__
    assert props["onnx_dacomp.method"] == "svd" and float(props["onnx_dacomp.ratio"]) == result.report.search["ratio"]
    kept = [row for row in result.report.layers if row.method is None]
    assert kept and all(row.reason != "not named in --ranks" for row in kept)
    assert not model.graph.node[0].doc_string  # the input model is untouched
    onnx.checker.check_model(result.model)


def test_public_functions_match_the_commands(tmp_path, capsys):
    from onnx_dacomp.cli import main

    model = conv_stack(channels=8, size=(12, 12), input_channels=3)
    model_path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(model, model_path)
    np.savez(data, x=np.random.default_rng(0).standard_normal((24, 3, 12, 12)).astype(np.float32))
    found = onnx_dacomp.inspect(str(model_path))
    assert [layer.name for layer in found.layers] == [f"conv{i}" for i in range(6)]
    assert found.inputs.names == ["x"] and found.params == sum(layer.params for layer in found.layers)
    statistics = onnx_dacomp.calibrate(str(model_path), str(data), DataConfig(limit=16), progress=False)
    assert statistics.samples == 16
    command = ["calibrate", str(model_path), "--data", str(data), "--limit", "16", "-o", str(tmp_path / "s.npz")]
    assert main(command) == 0
    from onnx_dacomp.calibration.statistics import load_statistics

    saved = load_statistics(tmp_path / "s.npz")
    for name, moments in statistics.layers.items():
        assert np.array_equal(moments.second, saved.layers[name].second)
    evaluation = onnx_dacomp.evaluate(
        str(model_path), str(model_path), str(data), progress=False, classifier_outputs=["r5"]
    )
    assert evaluation.comparison.top1_agreement == 1.0 and evaluation.comparison.rel_output_error == 0.0
