"""Patch statistics equal an independent float64 im2col reference; sources and errors behave."""

import math

import numpy as np
import pytest
from builders import SHARED, conv_model, conv_stack, reference_patches
from onnx import numpy_helper

from onnx_dacomp.calibration.collect import collect_statistics
from onnx_dacomp.calibration.sources import (
    ArraySource,
    ImageFolderSource,
    ImagePreprocessing,
    IterableSource,
    RandomSource,
)
from onnx_dacomp.calibration.statistics import load_statistics, save_statistics
from onnx_dacomp.errors import UserError
from onnx_dacomp.inputs import input_signature
from onnx_dacomp.targets import find_targets, read_weights


def reference_statistics(model, layer, batches):
    """Independent float64 im2col: explicit loops over output positions and kernel taps."""
    second, first, count = 0.0, 0.0, 0
    for batch in batches:
        patches = reference_patches(model, layer, batch)
        second = second + np.einsum("pgi,pgj->gij", patches, patches)
        first = first + patches.sum(0)
        count += len(patches)
    return second / count, first / count


def batches_of(rng, shape, count, dtype=np.float32):
    return [{"x": rng.standard_normal(shape).astype(dtype)} for _ in range(count)]


@pytest.mark.parametrize("mode", ["graph", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_statistics_match_im2col_reference(mode, dtype):
    model = conv_stack(dtype)
    scan = find_targets(model)
    batches = batches_of(np.random.default_rng(1), (3, 4, 9, 11), 2, dtype)
    stats = collect_statistics(model, scan.targets, batches, mode=mode, device="cpu", progress=False)
    assert stats.samples == 6 and len(stats.layers) == 6
    for layer in scan.targets:
        sigma, mean = reference_statistics(model, layer, batches)
        got = stats.layers[layer.name]
        assert got.second.shape == sigma.shape == (layer.group, *sigma.shape[1:])
        # float16 activations themselves differ by rounding between optimized and plain sessions
        tolerance = 1e-4 if dtype == np.float32 or layer.input == "x" else 5e-3
        assert np.abs(got.covariance - sigma).max() <= tolerance * np.abs(sigma).max(), layer.name
        assert np.abs(got.mean - mean).max() <= tolerance * np.abs(mean).max(), layer.name


def test_samples_per_run_follow_the_layer_input_size_and_leave_the_statistics_unchanged(monkeypatch):
    from onnx_dacomp.calibration import collect

    model = conv_stack()
    scan = find_targets(model)
    batches = batches_of(np.random.default_rng(4), (24, 4, 9, 11), 2)
    runs = []
    original = collect._Runner._run

    def counted(self, batch):
        runs.append(len(batch["x"]))
        return original(self, batch)

    monkeypatch.setattr(collect._Runner, "_run", counted)
    whole = collect_statistics(model, scan.targets, batches, progress=False)
    assert runs == [24, 24]  # small inputs: whole batches
    runs.clear()
    monkeypatch.setattr(collect, "RUN_BYTES", 1)  # every sample over the budget: the minimum per run
    chunked = collect_statistics(model, scan.targets, batches, progress=False)
    assert runs == [collect.CHUNK] * 6
    for name, layer in whole.layers.items():
        assert np.abs(chunked.layers[name].second - layer.second).max() <= 1e-5 * np.abs(layer.second).max()


def test_shards_in_a_worker_pool_give_the_same_bits_as_this_process(monkeypatch):
    from onnx_dacomp import workers
    from onnx_dacomp.calibration import collect

    model = conv_stack()
    scan = find_targets(model)
    batches = batches_of(np.random.default_rng(6), (5, 4, 9, 11), 9)  # 45 samples
    monkeypatch.setattr(collect, "SHARD_SAMPLES", 12)  # shards of 15, 15 and 15 samples (whole batches)
    monkeypatch.setattr(workers, "POOL_MIN_SECONDS", 0)
    submitted, submit = [], workers.Workers._submit
    monkeypatch.setattr(workers.Workers, "_submit", lambda self, f, t: submitted.append(t) or submit(self, f, t))
    alone = collect_statistics(model, scan.targets, batches, device="cpu", progress=False)
    assert not submitted
    updates = []
    real_progress = collect.log_progress

    def recorded(*args, **kwargs):
        bar = real_progress(*args, **kwargs)
        bar.update = lambda count=1, work=0.0: updates.append(count)
        return bar

    monkeypatch.setattr(collect, "log_progress", recorded)
    with workers.Workers(2) as pool:
        pooled = collect_statistics(model, scan.targets, batches, device="cpu", progress=False, workers=pool)
    assert [sum(len(batch["x"]) for batch in task.batches) for task in submitted] == [15, 15]  # the first: here
    assert sum(updates) == 45 and updates.count(5) == 9  # every run counted as it finished, in the workers too
    assert pooled.samples == alone.samples == 45
    for layer in scan.targets:
        got, reference = pooled.layers[layer.name], alone.layers[layer.name]
        assert np.array_equal(got.second, reference.second) and np.array_equal(got.first, reference.first)
        assert got.count == reference.count
        sigma, mean = reference_statistics(model, layer, batches)  # and both are right
        assert np.abs(got.covariance - sigma).max() <= 1e-4 * np.abs(sigma).max(), layer.name
        assert np.abs(got.mean - mean).max() <= 1e-4 * np.abs(mean).max(), layer.name


def test_merging_halves_equals_one_pass_and_statistics_round_trip(tmp_path):
    model = conv_stack()
    scan = find_targets(model)
    batches = batches_of(np.random.default_rng(2), (4, 4, 9, 11), 4)
    whole = collect_statistics(model, scan.targets, batches, progress=False)
    halves = collect_statistics(model, scan.targets, batches[:2], progress=False).merge(
        collect_statistics(model, scan.targets, batches[2:], progress=False)
    )
    assert halves.samples == whole.samples == 16
    for name, layer in whole.layers.items():
        np.testing.assert_allclose(halves.layers[name].second, layer.second, rtol=1e-12)
        np.testing.assert_allclose(halves.layers[name].first, layer.first, rtol=1e-12)
        assert halves.layers[name].count == layer.count

    path = save_statistics(whole, tmp_path / "stats.npz")
    loaded = load_statistics(path)
    assert loaded.samples == 16 and loaded.source == whole.source
    for name in whole.layers:
        np.testing.assert_array_equal(loaded.layers[name].second, whole.layers[name].second)
    loaded.check_model(scan.targets, read_weights(model, scan.targets))  # same model: accepted

    other_data = collect_statistics(
        model, scan.targets, batches_of(np.random.default_rng(3), (2, 4, 9, 11), 1), progress=False
    )
    other_data.check_model(scan.targets, read_weights(model, scan.targets))  # same model, other data: accepted
    different = conv_stack(seed=5)
    different_scan = find_targets(different)
    with pytest.raises(UserError, match="different model"):
        loaded.check_model(different_scan.targets, read_weights(different, different_scan.targets))


def test_batch_errors_name_the_input():
    model = conv_stack()
    targets = find_targets(model).targets
    rng = np.random.default_rng(4)

    def collect(batches):
        return collect_statistics(model, targets, batches, progress=False)

    with pytest.raises(UserError, match="yielded no samples"):
        collect([])
    with pytest.raises(UserError, match=r"batch 0 has inputs \['image'\], the model expects \['x'\]"):
        collect([{"image": rng.standard_normal((1, 4, 9, 11))}])
    with pytest.raises(UserError, match="input 'x' in batch 0: shape"):
        collect([{"x": rng.standard_normal((1, 3, 9, 11)).astype(np.float32)}])
    with pytest.raises(UserError, match="got uint8 data"):
        collect([{"x": np.zeros((1, 4, 9, 11), np.uint8)}])
    bad = rng.standard_normal((1, 4, 9, 11)).astype(np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(UserError, match="input 'x' in batch 1 contains NaN"):
        collect([{"x": np.zeros_like(bad)}, {"x": bad}])


def test_overflowing_activations_name_the_first_layer():
    model = conv_stack()
    first_weight = model.graph.initializer[0]
    first_weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first_weight) * np.float32(1e38), "w0"))
    targets = find_targets(model).targets
    batch = {"x": np.random.default_rng(0).standard_normal((1, 4, 9, 11)).astype(np.float32)}
    for mode in ("graph", "numpy"):  # conv0 overflows: conv1 is the first layer to see it
        with pytest.raises(UserError, match="layer conv1: the statistics of its input are NaN or Inf"):
            collect_statistics(model, targets, [batch], progress=False, mode=mode)


def test_array_sources(tmp_path):
    rng = np.random.default_rng(6)
    data = rng.standard_normal((10, 4, 9, 11)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=data[:6], labels=np.arange(6))
    np.savez(tmp_path / "b.npz", x=data[6:], labels=np.arange(6, 10))
    source = ArraySource(tmp_path, ["x"], batch_size=4)
    got = list(source.labelled())
    assert [len(b["x"]) for b, _ in got] == [4, 2, 4]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b, _ in got]), data)
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in got]), np.arange(10))
    assert sum(len(b["x"]) for b in ArraySource(tmp_path, ["x"], batch_size=4, limit=5)) == 5

    single = tmp_path / "single.npy"
    np.save(single, data)
    assert len(next(iter(ArraySource(single, ["x"], batch_size=32)))["x"]) == 10
    with pytest.raises(UserError, match=r"holds arrays \['a', 'b'\] but the model's inputs are \['x'\]"):
        np.savez(tmp_path / "multi.npz", a=data, b=data)
        list(ArraySource(tmp_path / "multi.npz", ["x"]))
    data[3, 0, 0, 0] = np.inf
    np.save(tmp_path / "inf.npy", data)
    with pytest.raises(UserError, match="inf.npy: array for input 'x' contains NaN or Inf"):
        list(ArraySource(tmp_path / "inf.npy", ["x"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .npz or .npy files"):
        ArraySource(tmp_path / "empty", ["x"])


def test_iterables_readers_and_random():
    rng = np.random.default_rng(7)
    arrays = [rng.standard_normal((2, 4, 9, 11)).astype(np.float32) for _ in range(3)]

    class Reader:  # onnxruntime's CalibrationDataReader protocol
        def __init__(self):
            self.items = iter({"x": a} for a in arrays)

        def get_next(self):
            return next(self.items, None)

    from_reader = [b["x"] for b in IterableSource(Reader(), ["x"])]
    from_list = [b["x"] for b in IterableSource(arrays, ["x"])]
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(arrays, from_reader, from_list))
    model = conv_stack()
    targets = find_targets(model).targets
    with_reader = collect_statistics(model, targets, IterableSource(Reader(), ["x"]), progress=False)
    with_list = collect_statistics(model, targets, arrays, progress=False)
    for name in with_list.layers:
        np.testing.assert_array_equal(with_reader.layers[name].second, with_list.layers[name].second)
    random_source = RandomSource(input_signature(model, {"x": (2, 4, 9, 11)}), batch_size=2, batches=2, seed=3)
    first, again = list(random_source), list(random_source)
    assert len(first) == 2 and np.array_equal(first[1]["x"], again[1]["x"])


def _write_images(folder, count, size=(12, 10), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")


def test_image_folder_preprocessing_against_hand_computation(tmp_path):
    from PIL import Image

    _write_images(tmp_path / "cats", 3)
    _write_images(tmp_path / "dogs", 2, seed=1)
    pre = ImagePreprocessing(size=(8, 8), resize=10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), channel_order="BGR")
    source = ImageFolderSource(tmp_path, "x", ("n", 3, 8, 8), pre, batch_size=10, seed=0)
    assert source.has_labels and source.classes == ["cats", "dogs"] and source.size == 5
    ((batch, labels),) = list(source.labelled())
    assert batch["x"].shape == (5, 3, 8, 8) and batch["x"].dtype == np.float32
    path, label = source.files[0]
    assert labels[0] == label == (0 if path.parent.name == "cats" else 1)
    # by hand: 12x10 (HxW) -> short side 10 stays 10 wide, 12 high; center crop 8x8; BGR; normalize
    pixels = np.asarray(Image.open(path).convert("RGB"), np.float32)[2:10, 1:9] / 255
    expected = ((pixels[:, :, ::-1] - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.5]).transpose(2, 0, 1)
    np.testing.assert_allclose(batch["x"][0], expected, atol=1e-5)

    nhwc = ImageFolderSource(tmp_path, "x", ("n", 8, 8, 3), ImagePreprocessing(size=(8, 8), layout="NHWC"))
    assert next(iter(nhwc))["x"].shape == (5, 8, 8, 3)
    halves = [ImageFolderSource(tmp_path, "x", ("n", 3, 8, 8), pre, limit=2, offset=o) for o in (0, 2)]
    assert not {p for p, _ in halves[0].files} & {p for p, _ in halves[1].files}


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        ImageFolderSource(tmp_path / "empty", "x", ("n", 3, 8, 8))
    _write_images(tmp_path / "flat", 2)
    (tmp_path / "flat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    source = ImageFolderSource(tmp_path / "flat", "x", ("n", 3, 8, 8), batch_size=8)
    assert not source.has_labels
    with pytest.raises(UserError, match="cannot read image .*broken.jpg"):
        list(source)
    with pytest.raises(UserError, match="dynamic height/width"):
        ImageFolderSource(tmp_path / "flat", "x", ("n", 3, "h", "w"))


def test_mean_and_std_take_one_value_or_one_per_channel(tmp_path, capsys):
    from onnx_dacomp.cli import main

    _write_images(tmp_path / "flat", 2, size=(8, 8))  # the model's size: used as they are
    for pre in (ImagePreprocessing(mean=(127.0, 127.0)), ImagePreprocessing(std=(1.0, 2.0, 3.0, 4.0))):
        with pytest.raises(UserError, match="for a 3-channel image input: give one value for every channel"):
            ImageFolderSource(tmp_path / "flat", "x", ("n", 3, 8, 8), preprocessing=pre)
    with pytest.raises(UserError, match="--mean 0.5,0.5,0.5 has 3 values for a 1-channel"):
        ImageFolderSource(tmp_path / "flat", "x", ("n", 1, 8, 8), preprocessing=ImagePreprocessing(mean=(0.5,) * 3))
    # (x - 127) / 128 on raw pixels: one value for every channel, against a hand computation
    pre = ImagePreprocessing(scale=1.0, mean=(127.0,), std=(128.0,))
    batch = next(iter(ImageFolderSource(tmp_path / "flat", "x", ("n", 3, 8, 8), preprocessing=pre, batch_size=2)))
    from PIL import Image

    first = sorted((tmp_path / "flat").iterdir())[0]
    pixels = np.asarray(Image.open(first).convert("RGB"), np.float32)
    expected = ((pixels - 127) / 128).transpose(2, 0, 1)
    assert np.abs(batch["x"][0] - expected).max() < 1e-5
    # on the command line: exit 2 before any work, no output
    model, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    import onnx

    onnx.save(conv_model(np.ones((4, 3, 3, 3)), input_shape=("n", 3, 8, 8)), model)
    assert main(["compress", str(model), "-o", str(out), "--data", str(tmp_path / "flat"), "--mean", "127,127"]) == 2
    assert "--mean 127,127 has 2 values" in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="../shared is absent")
def test_real_model_graph_path_matches_numpy_path(cifar_train):
    from onnx_dacomp.load import load_model

    model = load_model(SHARED / "models" / "cifar10_resnet20.onnx")
    scan = find_targets(model)
    pre = ImagePreprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    source = ImageFolderSource(cifar_train, "input", (None, 3, 32, 32), pre, batch_size=16, limit=48)
    graph = collect_statistics(model, scan.targets, source, mode="graph", progress=False, positions="all")
    numpy = collect_statistics(model, scan.targets, source, mode="numpy", progress=False)
    sampled = collect_statistics(model, scan.targets, source, mode="graph", progress=False)
    for name, layer in numpy.layers.items():
        assert np.abs(graph.layers[name].covariance - layer.covariance).max() <= 1e-5 * np.abs(layer.covariance).max()
        # layer1 (32x32) sums 1/16 of its positions, layer2 1/4, layer3 (8x8) all: an estimate of the same moments
        error = np.linalg.norm(sampled.layers[name].covariance - layer.covariance) / np.linalg.norm(layer.covariance)
        assert error < 0.3 if sampled.layers[name].count < layer.count else error < 1e-6, (name, error)


def test_cuda_device_is_used_or_refused_clearly():
    from onnx_dacomp.runtime import create_session, provider_name

    model = conv_stack()
    try:
        session = create_session(model, "cuda")
    except UserError as error:
        assert "CUDA execution provider could not start" in str(error)
    else:
        assert provider_name(session) == "CUDA"
    assert provider_name(create_session(model, "cpu")) == "CPU"
    assert provider_name(create_session(model, "auto")) in ("CUDA", "CPU")


def test_subsets_split_sources_into_disjoint_parts(tmp_path):
    first, second = np.arange(30, dtype=np.float32).reshape(10, 3), np.arange(30, 51, dtype=np.float32).reshape(7, 3)
    np.savez(tmp_path / "a.npz", x=first, labels=np.arange(10))
    np.save(tmp_path / "b.npy", second)
    source = ArraySource(tmp_path, ["x"], batch_size=4)
    assert source.size == 17

    def rows(part):
        return np.concatenate([batch["x"] for batch in part])

    everything = np.concatenate([first, second])
    head, tail = source.subset(0, 12), source.subset(12, None)
    assert (head.size, tail.size) == (12, 5)
    together = np.concatenate([rows(head), rows(tail)])  # disjoint, and every sample once
    assert np.array_equal(together[np.argsort(together[:, 0])], everything)
    # seeded random samples, not the first N (files are often sorted by class), the same on every pass
    assert not np.array_equal(rows(head), everything[:12]) and np.array_equal(rows(head), rows(head))
    middle = {tuple(row) for row in rows(source.subset(8, 4))}
    assert len(middle) == 4 and not middle & {tuple(row) for row in rows(source.subset(0, 8))}
    with pytest.raises(UserError, match="none are left"):
        source.subset(17, None)

    _write_images(tmp_path / "images" / "a", 6)
    _write_images(tmp_path / "images" / "b", 5, seed=1)
    images = ImageFolderSource(tmp_path / "images", "x", (1, 3, 8, 8), seed=3)
    parts = [images.subset(0, 4), images.subset(4, None)]
    names = [{path for path, _ in part.files} for part in parts]
    assert not names[0] & names[1] and len(names[0] | names[1]) == 11
    assert parts[0].size == 4 and parts[1].size == 7


def test_natural_photograph_crops_are_seeded_preprocessed_and_splittable():
    from onnx_dacomp.calibration.natural import NaturalImageSource

    pre = ImagePreprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), layout="NHWC")
    source = NaturalImageSource("x", (1, 20, 24, 3), pre, count=10, batch_size=4, seed=5)
    batches = [batch["x"] for batch in source]
    assert [len(b) for b in batches] == [4, 4, 2]
    everything = np.concatenate(batches)
    assert everything.shape == (10, 20, 24, 3) and everything.dtype == np.float32
    # pixels in [0, 255] / 255, then (p - 0.5) / 0.25: within [-2, 2], and real photographs vary
    assert everything.min() >= -2 and everything.max() <= 2 and everything.std() > 0.3
    again = np.concatenate([batch["x"] for batch in NaturalImageSource("x", (1, 20, 24, 3), pre, count=10, seed=5)])
    assert np.array_equal(everything, again)
    part = np.concatenate([batch["x"] for batch in source.subset(3, 4)])
    assert np.array_equal(part, everything[3:7])
    other_seed = np.concatenate([b["x"] for b in NaturalImageSource("x", (1, 20, 24, 3), pre, count=10, seed=6)])
    assert not np.array_equal(everything, other_seed)


@pytest.mark.parametrize(
    "kernel, attrs",
    [
        ((3,), dict(pads=[1, 2], dilations=[2])),
        ((4,), dict(pads=[0, 3], strides=[2])),
        ((5, 3), dict(pads=[4, 1, 0, 1], dilations=[1, 2])),  # strips that hold only padding
        ((2, 2), dict(pads=[3, 0, 3, 0], dilations=[3, 1], group=2)),  # pads wider than the kernel reach
        ((9,), dict(pads=[2, 3], strides=[3])),  # 45 row blocks: one stacked Gram
        ((7, 2), dict(pads=[3, 0, 3, 1], group=2)),  # stride 1, 49 products: stacked
    ],
)
def test_shift_structured_gram_matches_loops(kernel, attrs):
    """The in-graph Gram (row-shifted blocks plus strip corrections) against explicit loops, 1-D and 2-D."""
    rng = np.random.default_rng(7)
    group = attrs.get("group", 1)
    spatial = (13,) if len(kernel) == 1 else (10, 7)
    if kernel == (9,):
        spatial = (20,)
    model = conv_model(rng.standard_normal((4, 4 // group, *kernel)), input_shape=("n", 4, *spatial), **attrs)
    layer = find_targets(model).targets[0]
    batches = batches_of(rng, (2, 4, *spatial), 2)
    stats = collect_statistics(model, [layer], batches, mode="graph", device="cpu", progress=False, positions="all")
    stats = stats.layers[layer.name]
    strides, dilations = attrs.get("strides", [1] * len(kernel)), attrs.get("dilations", [1] * len(kernel))
    pads = attrs["pads"]
    rows = []
    for batch in batches:
        x = np.pad(batch["x"].astype(np.float64), [(0, 0), (0, 0), *zip(pads[: len(kernel)], pads[len(kernel) :])])
        out = [
            (x.shape[2 + a] - (k - 1) * d - 1) // s + 1 for a, (k, s, d) in enumerate(zip(kernel, strides, dilations))
        ]
        for n in range(len(x)):
            for position in np.ndindex(*out):
                patch = [
                    [
                        x[
                            (
                                n,
                                g * (4 // group) + c,
                                *(p * s + t * d for p, s, t, d in zip(position, strides, tap, dilations)),
                            )
                        ]
                        for c in range(4 // group)
                        for tap in np.ndindex(*kernel)
                    ]
                    for g in range(group)
                ]
                rows.append(patch)
    patches = np.array(rows)  # (positions, group, n)
    sigma = np.einsum("pgi,pgj->gij", patches, patches) / len(patches)
    assert stats.count == len(patches)
    np.testing.assert_allclose(stats.covariance, sigma, rtol=0, atol=1e-5 * np.abs(sigma).max())
    np.testing.assert_allclose(stats.mean, patches.mean(0), rtol=0, atol=1e-5 * np.abs(patches).max())


def _graph_sums(model, layers, batch, seeds):
    """The statistics-graph outputs of `layers` for `batch`, summed over runs with the position seeds `seeds`."""
    import onnxruntime as ort

    from onnx_dacomp.calibration.augment import augment
    from onnx_dacomp.layers import POSITION_SEED

    shapes = {layer.name: (1, *layer.input_shape[1:]) for layer in layers}
    augmented, outputs = augment(model, layers, shapes)
    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [value.name for value in augmented.graph.output]
    total = {}
    for seed in seeds:
        feed = {**batch, POSITION_SEED: np.array([seed], np.int64)}
        for name, value in zip(names, session.run(names, feed)):
            total[name] = total.get(name, 0) + np.asarray(value, np.float64)
    return outputs, total


def _sampled_layers():
    rng = np.random.default_rng(11)
    stack = conv_stack(size=(60, 62))  # steps from 8 down to 2: strided, dilated, grouped, auto-padded, 1x1
    pointwise = conv_model(rng.standard_normal((6, 2, 1, 1)), input_shape=("n", 4, 30, 29), strides=[2, 1], group=2)
    return [(stack, (2, 4, 60, 62)), (pointwise, (3, 4, 30, 29))]


@pytest.mark.parametrize("case", [0, 1])
def test_sampled_positions_partition_the_output_positions(case):
    """A sampled layer sums the grid of output positions its run's phase picks: each phase matches the loop
    reference restricted to that grid, and all phases together give every position exactly once."""
    from onnx_dacomp.layers.conv_statistics import position_steps

    model, shape = _sampled_layers()[case]
    batch = {"x": np.random.default_rng(12).standard_normal(shape).astype(np.float32)}
    layers = find_targets(model, {"x": shape}).targets
    steps = {layer.name: position_steps(layer.output_shape[2:]) for layer in layers}
    assert all(max(step) > 1 for step in steps.values())  # every layer here is sampled
    phases = max(math.prod(step) for step in steps.values())  # seeds 0.. cover each layer's phases equally
    outputs, total = _graph_sums(model, layers, batch, range(phases))
    for layer in layers:
        (step_y, step_x), (out_y, out_x) = steps[layer.name], layer.output_shape[2:]
        patches = reference_patches(model, layer, batch)  # (n, y, x) order
        grid = np.indices((shape[0], out_y, out_x)).reshape(3, -1)
        everything = outputs[layer.name].moments(total, shape[0])
        repeats = phases // (step_y * step_x)
        assert everything.count == repeats * len(patches)
        sigma = np.einsum("pgi,pgj->gij", patches, patches) / len(patches)
        assert np.abs(everything.covariance - sigma).max() <= 1e-5 * np.abs(sigma).max(), layer.name
        assert np.abs(everything.mean - patches.mean(0)).max() <= 1e-5 * np.abs(patches).max(), layer.name
        seed = 5
        one = outputs[layer.name].moments(_graph_sums(model, [layer], batch, [seed])[1], shape[0])
        phase_y, phase_x = seed % step_y, seed // step_y % step_x
        picked = patches[((grid[1] - phase_y) % step_y == 0) & ((grid[2] - phase_x) % step_x == 0)]
        assert one.count == len(picked)
        second = np.einsum("pgi,pgj->gij", picked, picked)
        assert np.abs(one.second - second).max() <= 1e-5 * np.abs(second).max(), layer.name
        assert np.abs(one.first - picked.sum(0)).max() <= 1e-5 * np.abs(picked).sum(0).max(), layer.name


def test_sampled_statistics_are_seeded_the_same_in_a_pool_and_exact_with_all_positions(monkeypatch):
    from onnx_dacomp import workers
    from onnx_dacomp.calibration import collect

    model, shape = _sampled_layers()[0]
    scan = find_targets(model, {"x": shape})
    batches = batches_of(np.random.default_rng(13), shape, 6)
    monkeypatch.setattr(collect, "SHARD_SAMPLES", 4)  # shards of 4 samples: two batches each
    monkeypatch.setattr(workers, "POOL_MIN_SECONDS", 0)
    sampled = collect_statistics(model, scan.targets, batches, device="cpu", progress=False)
    again = collect_statistics(model, scan.targets, batches, device="cpu", progress=False)
    other = collect_statistics(model, scan.targets, batches, device="cpu", progress=False, seed=1)
    with workers.Workers(2) as pool:
        pooled = collect_statistics(model, scan.targets, batches, device="cpu", progress=False, workers=pool)
    exact = collect_statistics(model, scan.targets, batches, device="cpu", progress=False, positions="all")
    for layer in scan.targets:
        name = layer.name
        assert np.array_equal(sampled.layers[name].second, again.layers[name].second)
        assert np.array_equal(sampled.layers[name].second, pooled.layers[name].second)
        assert np.array_equal(sampled.layers[name].first, pooled.layers[name].first)
        assert not np.array_equal(sampled.layers[name].second, other.layers[name].second)
        sigma, mean = reference_statistics(model, layer, batches)
        assert np.abs(exact.layers[name].covariance - sigma).max() <= 1e-4 * np.abs(sigma).max(), name
        assert exact.layers[name].count == 12 * math.prod(layer.output_shape[2:])
        assert sampled.layers[name].count < exact.layers[name].count / 3
        # a sample of the same positions: near the exact moments, and not equal to them
        error = np.linalg.norm(sampled.layers[name].covariance - sigma) / np.linalg.norm(sigma)
        assert 0 < error < 0.5, (name, error)  # a count normalisation off by the step would be >= 0.75


def _stft_model(rng, frames: int = 4):
    """Reflect-padded audio -> a 1-D conv of kernel 256, stride 128 (an STFT front end) -> a 3-tap conv."""
    from onnx import TensorProto, helper

    length = 128 * frames
    nodes = [
        helper.make_node("Unsqueeze", ["audio", "axis"], ["channel"]),
        helper.make_node("Pad", ["channel", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Conv", ["padded", "basis"], ["spectrum"], name="stft", kernel_shape=[256], strides=[128]),
        helper.make_node("Relu", ["spectrum"], ["magnitude"]),
        helper.make_node("Conv", ["magnitude", "w"], ["y"], name="conv", kernel_shape=[3], pads=[1, 1]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
        numpy_helper.from_array(np.array([0, 0, 64, 0, 0, 64], np.int64), "pads"),
        numpy_helper.from_array(rng.standard_normal((40, 1, 256)).astype(np.float32) / 16, "basis"),
        numpy_helper.from_array(rng.standard_normal((8, 40, 3)).astype(np.float32), "w"),
    ]
    graph = helper.make_graph(
        nodes, "stft", [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["n", length])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), length


@pytest.mark.parametrize("exposed", [False, True])
def test_stft_front_end_statistics_start_at_once_and_match_loops(monkeypatch, exposed):
    """A kernel of 256 taps at stride 128 on reflect-padded audio: a bounded statistics graph (one stacked
    Gram, or, past the node limit, the layer input summed in numpy) equal to explicit loops over frames."""
    import time

    from onnx_dacomp.calibration import augment

    if exposed:
        monkeypatch.setattr(augment, "MAX_LAYER_NODES", 20)
    rng = np.random.default_rng(3)
    model, length = _stft_model(rng)
    layers = find_targets(model).targets
    batches = [{"audio": rng.standard_normal((5, length)).astype(np.float32)} for _ in range(2)]
    shapes = {layer.name: (1, *layer.input_shape[1:]) for layer in layers}
    graph, outputs = augment.augment(model, layers, shapes)
    assert len(graph.graph.node) < 1200  # was 33,000 Gemms for the 256-tap layer alone
    assert isinstance(outputs["stft"], augment.ExposedInput) == exposed
    start = time.perf_counter()
    stats = collect_statistics(model, layers, batches, mode="graph", device="cpu", progress=False)
    assert time.perf_counter() - start < 30  # the graph took minutes to load before
    frames = []
    for batch in batches:
        padded = np.pad(batch["audio"].astype(np.float64), [(0, 0), (64, 64)], mode="reflect")
        frames.extend(sample[start : start + 256] for sample in padded for start in range(0, len(sample) - 255, 128))
    frames = np.array(frames)
    got = stats.layers["stft"]
    assert got.count == len(frames) == 2 * 5 * 4
    sigma = frames.T @ frames / len(frames)
    np.testing.assert_allclose(got.covariance[0], sigma, rtol=0, atol=1e-5 * np.abs(sigma).max())
    np.testing.assert_allclose(got.mean[0], frames.mean(0), rtol=0, atol=1e-5 * np.abs(frames).max())
    # the next layer's statistics are unaffected by the first one's path
    reference = collect_statistics(model, layers, batches, mode="numpy", device="cpu", progress=False)
    np.testing.assert_allclose(
        stats.layers["conv"].covariance, reference.layers["conv"].covariance, rtol=1e-4, atol=1e-6
    )
