"""Command-line options that select and preprocess data, shared by the commands that read data."""

from __future__ import annotations

import argparse

from ..calibrate.sources import ImagePreprocessing, Source, open_source
from ..runtime import DEVICES


def add_data_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        required=required,
        metavar="SOURCE",
        help="folder of images (class sub-folders or flat), .npz/.npy file or folder, 'natural' (crops of "
        "photographs shipped with scikit-image) or 'random'",
    )
    group.add_argument("--batch-size", type=positive_int, default=32)
    group.add_argument("--limit", type=positive_int, help="use at most this many samples (a seeded random subset)")
    group.add_argument("--seed", type=int, default=0, help="seed for subsets and random data (default 0)")
    images = parser.add_argument_group("image preprocessing (image folders)")
    images.add_argument("--size", type=_size, help="final H or HxW (default: the model input size)")
    images.add_argument("--resize", type=positive_int, help="resize the short side to this before the crop")
    images.add_argument("--no-center-crop", action="store_true", help="resize straight to --size")
    images.add_argument("--scale", type=float, default=1 / 255, help="pixel multiplier before mean/std (1/255)")
    images.add_argument(
        "--mean", type=_floats, default=(0.0, 0.0, 0.0), help="per-channel mean, e.g. 0.485,0.456,0.406"
    )
    images.add_argument("--std", type=_floats, default=(1.0, 1.0, 1.0), help="per-channel std, e.g. 0.229,0.224,0.225")
    images.add_argument("--bgr", action="store_true", help="feed channels in BGR order")
    images.add_argument("--nhwc", action="store_true", help="the model takes NHWC images")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME:NxCxHxW", help="fix dynamic input dims (repeatable)"
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="execution provider (default auto)")


def preprocessing_from_args(args: argparse.Namespace) -> ImagePreprocessing:
    return ImagePreprocessing(
        size=args.size,
        resize=args.resize,
        center_crop=not args.no_center_crop,
        scale=args.scale,
        mean=args.mean,
        std=args.std,
        channel_order="BGR" if args.bgr else "RGB",
        layout="NHWC" if args.nhwc else "NCHW",
    )


def source_from_args(args: argparse.Namespace, model, input_shapes, *, apply_limit: bool = True) -> Source:
    """The source `--data` names; `apply_limit=False` leaves `--limit` to the caller (compress applies it
    after setting the held-out samples aside)."""
    return open_source(
        args.data,
        model,
        preprocessing=preprocessing_from_args(args),
        batch_size=args.batch_size,
        limit=args.limit if apply_limit else None,
        seed=args.seed,
        input_shapes=input_shapes,
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or min(dims, default=0) < 1:
        raise argparse.ArgumentTypeError(f"expected H or HxW, got {text!r}")
    return (dims[0], dims[-1])


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
