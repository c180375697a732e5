"""What a run should do: frozen configs grouped by stage, and the only copy of every default.

`CompressConfig` holds one config per stage: `data` (what is read and how it is preprocessed), `fit` (the
solvers), `plan` (the ranks: method, budget, targets), `runtime` (device, seed, timing batch) and `verify`
(held-out data, benchmark). Each field carries its command-line flag and help as metadata: the CLI builds its
options from these classes, so the command line and the Python API cannot drift apart.

    CompressConfig(ratio=0.5, method="auto")               # flat options, each routed to its group
    CompressConfig(plan=PlanConfig(ratio=0.5), fit=FitConfig(bias_refit=True))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import UserError
from .methods import AUTO
from .methods import CHOICES as METHOD_CHOICES

NORMS = ("sigma", "frobenius")
COMPENSATIONS = ("tail", "all", "none")
BUDGETS = ("params", "macs", "latency")
ALLOCATIONS = ("allocated", "uniform")
DEVICES = ("auto", "cuda", "cpu")
POSITIONS = ("sampled", "all")
KINDS = ("conv", "dense")  # the layer kinds of layers/ by their `kind`
DEFAULT_RATIO = 0.5  # the target when no ratio, exact ranks or accuracy target is given
CROP_FRACTION = 0.875  # final size / resized short side (torchvision and timm evaluation: 224 of 256)
Shape = tuple[int, ...]


def option(default, help: str, **cli):
    """A config field: its default and, as metadata, what the CLI needs (`help`, and optionally `flag`,
    `parse` (str -> value; for `repeat` options list -> value), `deferred` (parse after the command line
    is read: the parser reads files or raises `UserError`), `choices`, `metavar`, `nargs`, `repeat`,
    `shorthand` {flag: value}, `shown` (the default as the help shows it))."""
    metadata = {"help": help, **cli}
    if isinstance(default, (dict, list)):
        return field(default_factory=type(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# parsers of command-line text (argparse turns their ValueError into a one-line usage error)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def number(text: str) -> float:
    """A float, also written as a fraction (`1/255`)."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number such as 0.5 or 1/255, got {text!r}") from None


def unit_ratio(text: str) -> float:
    value = number(text)
    if not 0 < value <= 1:
        raise ValueError(f"expected a number in (0, 1], got {text!r}")
    return value


def numbers(text: str) -> tuple[float, ...]:
    return tuple(number(part) for part in text.split(","))


def image_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or min(dims, default=0) < 1:
        raise ValueError(f"expected H or HxW, got {text!r}")
    return (dims[0], dims[-1])


def rank_multiple(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return positive_int(text)
    except ValueError:
        raise ValueError(f"expected 'auto' or a positive integer, got {text!r}") from None


def input_shapes(specs) -> dict[str, Shape]:
    """`name:1x3x224x224` strings (several per string separated by commas) -> {name: shape}."""
    shapes: dict[str, Shape] = {}
    for spec in specs:
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, dims = item.rpartition(":")
            try:  # -1 or ? keeps a dim dynamic
                shape = tuple(-1 if d in ("?", "-1") else int(d) for d in dims.lower().split("x"))
            except ValueError:
                shape = ()
            if not sep or not name or not shape or any(d == 0 or d < -1 for d in shape):
                raise UserError(
                    f"bad --input-shape {item!r}: expected NAME:D1xD2x... (-1 or ? for a dynamic dim), "
                    f"e.g. input:1x3x224x224"
                )
            shapes[name] = shape
    return shapes


def batch_axes(specs) -> dict[str, int | None]:
    """`name:1` or `name:none` strings (several per string separated by commas) -> {name: axis or None}."""
    axes: dict[str, int | None] = {}
    for spec in specs:
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, axis = item.rpartition(":")
            if not sep or not name or not (axis.isdigit() or axis.lower() == "none"):
                raise UserError(f"bad --batch-axis {item!r}: expected NAME:AXIS or NAME:none, e.g. state:1")
            axes[name] = None if axis.lower() == "none" else int(axis)
    return axes


def kinds(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    if not chosen or set(chosen) - set(KINDS):
        raise ValueError(f"expected layer kinds from {', '.join(KINDS)}, comma-separated, got {text!r}")
    return chosen


def ranks_file(path: str) -> dict:
    """A JSON file mapping layer names to ranks (`--ranks`)."""
    try:
        ranks = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read --ranks file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--ranks file {path} is not valid JSON: {exc}") from None
    if not isinstance(ranks, dict):
        raise UserError(f"--ranks file {path} must hold an object mapping layer names to ranks")
    return ranks


@dataclass(frozen=True)
class ImagePreprocessing:
    """How image files become model input (torchvision/timm style): resize the short side, center crop,
    scale, mean/std, channel order, layout."""

    size: tuple[int, int] | None = option(
        None, "final image size H or HxW (default: the model input's)", parse=image_size, metavar="H|HxW"
    )
    resize: int | None = option(
        None, "resize the short side to this before the center crop (default: the final size / 0.875, 256 for 224, "
        "as torchvision and timm evaluate; images already of the final size are used as they are)",
        parse=positive_int, metavar="N",
    )  # fmt: skip
    center_crop: bool = option(True, "resize straight to --size, ignoring the aspect ratio", flag="--no-center-crop")
    scale: float = option(1 / 255, "pixel multiplier before mean/std", parse=number, shown="1/255")
    mean: tuple[float, ...] = option(
        (0.0,), "mean subtracted after --scale: one value, or one per channel, e.g. 0.485,0.456,0.406", parse=numbers
    )
    std: tuple[float, ...] = option(
        (1.0,), "std divided by after the mean: one value, or one per channel, e.g. 0.229,0.224,0.225", parse=numbers
    )
    channel_order: str = option(
        "RGB", "channel order fed to the model", choices=("RGB", "BGR"), shorthand={"--bgr": "BGR"}
    )
    layout: str = option(
        "NCHW", "image layout of the model input", choices=("NCHW", "NHWC"), shorthand={"--nhwc": "NHWC"}
    )

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR"):
            raise UserError(f"channel order must be RGB or BGR, not {self.channel_order!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise UserError(f"layout must be NCHW or NHWC, not {self.layout!r}")
        if any(s == 0 for s in self.std):
            raise UserError("--std values must be non-zero")

    def check_channels(self, channels: int) -> None:
        """--mean and --std give one value or one per channel of the model's images."""
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if len(values) not in (1, channels):
                given = ",".join(f"{value:g}" for value in values)
                raise UserError(
                    f"{flag} {given} has {len(values)} values for a {channels}-channel image input: give one value "
                    f"for every channel or exactly {channels}"
                )

    def apply(self, image, size: tuple[int, int], channels: int) -> np.ndarray:
        """A PIL image -> float32 array (C, H, W) or (H, W, C)."""
        from PIL import Image

        image = image.convert("L" if channels == 1 else "RGB")
        height, width = size
        if image.size == (width, height):
            pass
        elif self.center_crop:
            short = self.resize or round(max(height, width) / CROP_FRACTION)
            factor = short / min(image.size)
            target = (max(width, round(image.size[0] * factor)), max(height, round(image.size[1] * factor)))
            if target != image.size:
                image = image.resize(target, Image.BILINEAR)
            left, top = (image.size[0] - width) // 2, (image.size[1] - height) // 2
            image = image.crop((left, top, left + width, top + height))
        elif image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        return self.normalize(image, channels)

    def normalize(self, image, channels: int) -> np.ndarray:
        """A PIL image of the final size -> float32 array: scale, channel order, mean/std, layout."""
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) * np.float32(self.scale)
        if array.ndim == 2:
            array = array[:, :, None]
        if self.channel_order == "BGR":
            array = array[:, :, ::-1]
        self.check_channels(channels)
        mean = np.broadcast_to(np.asarray(self.mean, np.float32), (channels,))
        std = np.broadcast_to(np.asarray(self.std, np.float32), (channels,))
        array = (array - mean) / std
        return np.ascontiguousarray(array.transpose(2, 0, 1) if self.layout == "NCHW" else array)


@dataclass(frozen=True)
class DataConfig:
    """What is read from the data and how."""

    batch_size: int = option(32, "samples per onnxruntime run", parse=positive_int)
    limit: int | None = option(
        None, "use at most this many samples (a seeded random subset; for compress, after the held-out ones)",
        parse=positive_int, metavar="N",
    )  # fmt: skip
    input_shapes: Mapping[str, Shape] = option(
        {}, "fix dynamic input dims; -1 keeps a dim dynamic (repeatable)", flag="--input-shape",
        parse=input_shapes, repeat=True, metavar="NAME:D1xD2x...",
    )  # fmt: skip
    batch_axes: Mapping[str, int | None] = option(
        {}, "the axis of an input that holds the samples, or none for an input given once (repeatable; default: "
        "inferred from the model's dims)", flag="--batch-axis", parse=batch_axes, repeat=True, metavar="NAME:AXIS|none",
    )  # fmt: skip
    labels: str | None = option(
        None, "class labels of an image folder: a CSV/TSV file of image file name and class index", metavar="FILE"
    )
    class_order: str | None = option(
        None, "class sub-folder names in the model's class order, one per line (default: sorted names, used only "
        "when every class has a folder)", metavar="FILE",
    )  # fmt: skip
    positions: str | None = option(
        None, "output positions of a conv whose patch statistics are summed: sampled (a random grid per run "
        "on large feature maps, at least 7 rows per axis: unbiased, several times cheaper) or all (exact)",
        choices=POSITIONS, shown="sampled; all with --propagate, whose cross statistics take every position",
    )  # fmt: skip
    preprocessing: ImagePreprocessing = field(default_factory=ImagePreprocessing)

    def __post_init__(self):
        if self.positions is not None:
            _check_choice("positions", self.positions, POSITIONS)
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be a positive integer, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be a positive integer, got {self.limit}")


@dataclass(frozen=True)
class FitConfig:
    """What each layer's fit minimizes and how long its solver runs."""

    norm: str = option("sigma", "sigma: distribution-aware; frobenius: data-free", choices=NORMS)
    max_iter: int = option(20, "ALS sweeps per layer at most", parse=int)
    bias_refit: bool = option(False, "refit biases (fit in the centered covariance); never worse")
    propagate: bool = option(False, "fit each layer on the input the compressed layers before it give")
    # tail by measurement: the classifier after the compressed layers gave nearly all of the gain (ResNet-56 at
    # 0.5: output error 0.0114 -> 0.0113 from 15 kept convs, -> 0.0104 from the classifier) for a fraction of the
    # time (EfficientNet-Lite0 conv-only at 0.5: 16 waves, 329 s, 0.580 -> 0.571)
    # on by default by measurement: `auto` at 0.5, ResNet-20 79.97 -> 80.45 %, ResNet-56 82.69 -> 82.91 % top-1
    # (docs/BENCHMARKS.md)
    refit_outputs: bool = option(
        True, "keep each chain's last conv as fitted (default: where a ReLU or ReLU6 reads a compressed layer, refit "
        "it on the input it gets in the compressed model, through that activation; kept where the output error "
        "falls)", flag="--no-refit-outputs",
    )  # fmt: skip
    compensate: str = option(
        "tail", "refit kept layers on the input the compressed ones give them: tail (those after every compressed "
        "layer), all (every kept layer downstream of one), none", choices=COMPENSATIONS,
    )  # fmt: skip

    def __post_init__(self):
        _check_choice("norm", self.norm, NORMS)
        _check_choice("compensate", self.compensate, COMPENSATIONS)
        if self.max_iter < 0:
            raise UserError(f"--max-iter must be >= 0, got {self.max_iter}")
        if self.propagate and self.norm != "sigma":
            raise UserError("--propagate is part of the distribution-aware fit: it needs --norm sigma")


@dataclass(frozen=True)
class PlanConfig:
    """Which layers get which ranks: the method, the budget or accuracy target, and per-layer overrides."""

    # auto by measurement: at the same ratio it is never less accurate than Tucker-2 alone (ResNet-56 at 0.5:
    # 82.8 % against 77.9 % top-1, ResNet-20 79.8 % against 72.6 %; EfficientNet-Lite0 the same model) for
    # about twice the rank-selection time
    method: str = option(
        "auto", "decomposition; auto lets the allocation pick Tucker-2, CP or SVD per layer, or channel pruning "
        "where other layers compute a layer's input channels (they then compute fewer)", choices=METHOD_CHOICES,
    )  # fmt: skip
    ratio: float | None = option(
        None, "target size of the decomposable part relative to before", parse=unit_ratio,
        shown=f"{DEFAULT_RATIO}, or none with --ranks, --max-drop or --min-agreement",
    )  # fmt: skip
    max_drop: float | None = option(
        None, "instead of --ratio: the smallest model within this top-1 drop (labeled data)", parse=number,
        metavar="POINTS",
    )  # fmt: skip
    min_agreement: float | None = option(
        None, "instead of --ratio: the smallest model with this top-1 agreement", parse=number, metavar="FRACTION"
    )
    max_error: float | None = option(
        None, "instead of --ratio: the smallest model whose held-out relative output error (worst output, or "
        "--target-output) is at most this; needs no labels", parse=number, metavar="E",
    )  # fmt: skip
    target_output: str | None = option(
        None, "the output --max-error applies to (default: the worst of all outputs)", metavar="NAME"
    )
    speedup: float | None = option(
        None, "instead of --ratio: the most accurate model at least this many times faster than the original, "
        "measured end to end at --speedup-batch (its ratio counts MACs, or measured latency with --budget latency)",
        parse=number, metavar="X",
    )  # fmt: skip
    speedup_batch: int = option(1, "the batch size --speedup is measured at", parse=positive_int, metavar="B")
    budget: str = option("params", "what --ratio counts", choices=BUDGETS)
    allocation: str = option("allocated", "ranks across layers", choices=ALLOCATIONS)
    ranks: Mapping[str, object] = option(
        {}, 'exact ranks per layer, e.g. {"conv1": [16, 8]}', parse=ranks_file, deferred=True, metavar="RANKS.json"
    )
    exclude: tuple[str, ...] = option((), "glob patterns of layers to keep", nargs="+", metavar="PATTERN")
    layer_kinds: tuple[str, ...] = option(
        KINDS, "the kinds of layer to compress and to count in the budget", parse=kinds, metavar="conv,dense",
        shown=",".join(KINDS),
    )  # fmt: skip
    rank_multiple: int | None = option(
        None, "round ranks to multiples of N", parse=rank_multiple, metavar="N|auto",
        shown="auto: the execution provider's channel block",
    )  # fmt: skip
    sensitivity: bool = option(
        True, "count every layer's error alike in the allocation (default: weighted by measured output sensitivity)",
        flag="--no-sensitivity",
    )  # fmt: skip
    reallocate: bool = option(
        True, "keep the allocation as the sensitivity probes make it (default: each compressed layer's share of the "
        "output error measured at the chosen plan, the weights corrected, the budget allocated once more and the "
        "better model kept)", flag="--no-reallocate",
    )  # fmt: skip
    sensitivity_samples: int | None = option(
        None, "calibration samples each layer's sensitivity probe runs on (whole batches; default: 128, fewer for "
        "models that cost more per sample, down to 32)", parse=positive_int, metavar="N",
    )  # fmt: skip
    require_speedup: bool = option(
        False, "time each chain against its layer in onnxruntime; keep the layer where the chain is not faster"
    )

    def __post_init__(self):
        _check_choice("method", self.method, METHOD_CHOICES)
        _check_choice("budget", self.budget, BUDGETS)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        if not self.layer_kinds or set(self.layer_kinds) - set(KINDS):
            raise UserError(f"--layer-kinds takes {', '.join(KINDS)}, got {list(self.layer_kinds)}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise UserError(f"--ratio must lie in (0, 1], got {self.ratio}")
        targets = [self.max_drop, self.min_agreement, self.max_error]
        if sum(target is not None for target in targets) > 1:
            raise UserError("give one of --max-drop, --min-agreement and --max-error")
        if self.targeted and self.ratio is not None:
            raise UserError(
                "--ratio and --max-drop/--min-agreement/--max-error exclude each other: the search sets the ratio"
            )
        if self.speedup is not None and (self.targeted or self.ratio is not None):
            raise UserError("--speedup sets the ratio itself: give it without --ratio, --max-drop, ... ")
        if self.speedup is not None and self.speedup <= 1:
            raise UserError(f"--speedup is a factor above 1 (1.3: 30% faster), got {self.speedup}")
        if self.max_error is not None and not 0 < self.max_error <= 1:
            raise UserError(f"--max-error is a relative output error in (0, 1], got {self.max_error}")
        if self.target_output is not None and self.max_error is None:
            raise UserError("--target-output names the output --max-error applies to: give --max-error too")
        if self.max_drop is not None and not 0 <= self.max_drop <= 100:
            raise UserError(f"--max-drop is in top-1 points (0 to 100), got {self.max_drop}")
        if self.min_agreement is not None and not 0 < self.min_agreement <= 1:
            raise UserError(f"--min-agreement must lie in (0, 1], got {self.min_agreement}")
        if self.sensitivity_samples is not None and self.sensitivity_samples < 1:
            raise UserError(f"--sensitivity-samples must be a positive integer, got {self.sensitivity_samples}")
        if self.rank_multiple is not None and self.rank_multiple < 1:
            raise UserError(f"--rank-multiple must be a positive integer, got {self.rank_multiple}")
        if self.budget == "latency" and self.allocation != "allocated":
            raise UserError("--budget latency needs --allocation allocated (uniform ranks follow parameter counts)")

    @property
    def targeted(self) -> bool:
        """Whether an accuracy target sets the ratio (by search)."""
        return self.max_drop is not None or self.min_agreement is not None or self.max_error is not None

    @property
    def target_ratio(self) -> float | None:
        """The budget ratio: the one given, else the default unless exact ranks or a target replace it."""
        if self.ratio is not None or self.targeted or self.speedup is not None or self.ranks:
            return self.ratio
        return DEFAULT_RATIO

    @property
    def uses_auto(self) -> bool:
        return self.method == AUTO


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the work runs."""

    device: str = option(
        "auto", "execution provider (auto: CUDA where it really starts, else the CPU)", choices=DEVICES
    )
    seed: int = option(0, "seed of everything random (data subsets, natural crops, solver starts)", parse=int)
    speed_batch: int = option(1, "batch size of the latency measurements", parse=positive_int)
    timing_threads: int | None = option(
        None, "onnxruntime threads of both models in every latency measurement (end to end, the --speedup probes, "
        "one-layer tables): as many as the model will get where it runs", parse=positive_int,
        shown="each model on one per core or on one, whichever it runs faster on at the moment (each round)",
    )  # fmt: skip
    workers: int | None = option(
        None, "processes for calibration shards and per-layer work (candidate tables, probes, fits)",
        parse=positive_int, shown="the machine's cores",
    )  # fmt: skip
    ray: str | None = option(
        None, "run the per-layer work on a Ray cluster: auto (the running one), local, or ray://HOST:PORT "
        "(pip install 'onnx-dacomp[ray]')", metavar="ADDRESS",
    )  # fmt: skip
    cache_dir: str | None = option(
        None, "keep statistics, candidate tables, sensitivities and fits here: a rerun resumes and reuses them",
        metavar="DIR",
    )  # fmt: skip

    def __post_init__(self):
        _check_choice("device", self.device, DEVICES)
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be a positive integer, got {self.workers}")
        if self.speed_batch < 1:
            raise UserError(f"--speed-batch must be a positive integer, got {self.speed_batch}")
        if self.timing_threads is not None and self.timing_threads < 1:
            raise UserError(f"--timing-threads must be a positive integer, got {self.timing_threads}")


@dataclass(frozen=True)
class VerifyConfig:
    """How the result is checked against the original."""

    holdout: int = option(
        500, "samples kept out of calibration for verification (a fifth of the data at most)", parse=int
    )
    eval_data: str | None = option(
        None, "verify on this data (any --data form) instead of a held-out part of --data, which then calibrates "
        "whole", metavar="SOURCE",
    )  # fmt: skip
    benchmark: bool = option(
        True, "skip the closing end-to-end latency measurement of both models", flag="--no-benchmark"
    )
    layer_timings: bool = option(
        False, "time every layer and the chain that replaces it, alone in onnxruntime at --speed-batch (report)"
    )
    benchmark_batch: int = option(
        32, "the serving batch size of the closing latency measurement (besides batch 1)", parse=positive_int
    )
    benchmark_seconds: float = option(
        10.0, "at most this long per batch size for the closing latency measurement (until the ratio's 95%% "
        "interval is within +-3%%); a --speedup probe whose interval straddles the target up to six times as "
        "long", parse=number, metavar="S",
    )  # fmt: skip
    classifier_outputs: tuple[str, ...] = option(
        (), "score this output as class scores (top-1; a map [N, C, ...] per position) whatever its shape and "
        "producer (repeatable; default: [N, C] outputs of a linear layer or softmax)", flag="--classifier-output",
        parse=tuple, repeat=True, metavar="NAME",
    )  # fmt: skip

    def __post_init__(self):
        if self.holdout < 0:
            raise UserError(f"--holdout must be >= 0, got {self.holdout}")
        if self.benchmark_seconds <= 0:
            raise UserError(f"--benchmark-seconds must be positive, got {self.benchmark_seconds}")


GROUPS = {"data": DataConfig, "fit": FitConfig, "plan": PlanConfig, "runtime": RuntimeConfig, "verify": VerifyConfig}


@dataclass(frozen=True, init=False)
class CompressConfig:
    """Options of one compression run, one config per stage. Built from groups, from flat options (each name
    belongs to exactly one group, see `GROUPS`; image preprocessing options go to `data.preprocessing`), or
    both: `CompressConfig(ratio=0.5, method="auto", data=DataConfig(limit=2000))`."""

    data: DataConfig
    fit: FitConfig
    plan: PlanConfig
    runtime: RuntimeConfig
    verify: VerifyConfig

    def __init__(self, data=None, fit=None, plan=None, runtime=None, verify=None, **options):
        given = {"data": data, "fit": fit, "plan": plan, "runtime": runtime, "verify": verify}
        routed: dict[str, dict] = {group: {} for group in GROUPS}
        preprocessing = {}
        for name, value in options.items():
            group = _OWNER.get(name)
            if group is None:
                raise UserError(f"unknown option {name!r}")
            (preprocessing if group == "preprocessing" else routed[group])[name] = value
        for group, cls in GROUPS.items():
            base = given[group] if given[group] is not None else cls()
            updates = routed[group]
            if group == "data" and preprocessing:
                updates["preprocessing"] = _replace(base.preprocessing, preprocessing)
            object.__setattr__(self, group, _replace(base, updates))

    def options(self) -> dict[str, object]:
        """Every option by its flat name (the report's settings)."""
        flat = {}
        for group in GROUPS:
            for name, value in asdict(getattr(self, group)).items():
                if name == "preprocessing":
                    flat.update(value)
                else:
                    flat[name] = value
        return flat

    def replace(self, **options) -> CompressConfig:
        """A copy with the flat `options` changed."""
        return CompressConfig(**{group: getattr(self, group) for group in GROUPS}, **options)


def _replace(config, updates: Mapping[str, object]):
    if not updates:
        return config
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    values.update(updates)
    return type(config)(**values)


def _check_choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}: use one of {', '.join(allowed)}")


def _owners() -> dict[str, str]:
    owners = {f.name: "preprocessing" for f in fields(ImagePreprocessing)}
    for group, cls in GROUPS.items():
        for f in fields(cls):
            if f.name != "preprocessing":
                assert f.name not in owners, f"option {f.name} is defined twice"
                owners[f.name] = group
    return owners


_OWNER = _owners()


def default_of(f) -> object:
    """A field's default value."""
    return f.default_factory() if f.default is MISSING else f.default
