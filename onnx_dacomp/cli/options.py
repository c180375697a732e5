"""Command-line options built from the config classes' fields: each field's flag, parser, help and default
come from `config.py`, so the CLI restates nothing and adds no rules of its own."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..config import DataConfig, ImagePreprocessing, default_of, positive_int


def add_options(parser, config_class, *, only=None, title: str | None = None) -> None:
    """One option per field of `config_class` (or of the fields named in `only`), in a group `title`."""
    target = parser.add_argument_group(title) if title else parser
    for f in fields(config_class):
        if "help" not in f.metadata or (only is not None and f.name not in only):
            continue
        meta, default = f.metadata, default_of(f)
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        common = dict(dest=f.name, default=argparse.SUPPRESS)
        if isinstance(default, bool):
            action = "store_false" if default else "store_true"
            target.add_argument(flag, action=action, help=meta["help"], **common)
            continue
        shown = meta.get("shown", default)
        text = meta["help"] + ("" if shown in (None, (), {}) else f" (default {_text(shown)})")
        metavar = meta.get("metavar") or ("N" if meta.get("parse") in (int, positive_int) else None)
        kwargs = dict(help=text, metavar=metavar, choices=meta.get("choices"), nargs=meta.get("nargs"))
        if meta.get("repeat"):
            kwargs["action"] = "append"
        elif meta.get("parse") in (int, float):
            kwargs["type"] = meta["parse"]  # argparse's own message for a bad number
        elif "parse" in meta and not meta.get("deferred"):
            kwargs["type"] = _argument_type(meta["parse"])
        target.add_argument(flag, **{k: v for k, v in kwargs.items() if v is not None}, **common)
        for shorthand, value in meta.get("shorthand", {}).items():
            target.add_argument(shorthand, action="store_const", const=value, help=f"same as {flag} {value}", **common)


def add_data_options(parser) -> None:
    """--data-related options: the data config (with --input-shape) and image preprocessing."""
    add_options(parser, DataConfig, title="data")
    add_options(parser, ImagePreprocessing, title="image preprocessing (image folders)")


def values(args: argparse.Namespace, config_class) -> dict:
    """The options of `config_class` given on the command line, parsed (defaults stay the config's)."""
    given = {}
    for f in fields(config_class):
        if f.name in vars(args):
            value = getattr(args, f.name)
            parse = f.metadata.get("parse")
            later = f.metadata.get("repeat") or f.metadata.get("deferred")
            given[f.name] = parse(value) if later and parse else value
    return given


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(**values(args, DataConfig), preprocessing=ImagePreprocessing(**values(args, ImagePreprocessing)))


def _argument_type(parse):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__  # argparse names the type in its messages
    return convert


def _text(value) -> str:
    if isinstance(value, tuple):
        return ",".join(_text(v) for v in value)
    return str(value)
