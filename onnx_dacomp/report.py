"""What a compression run did, per layer and in total: a table for the log and JSON for `--report`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from .channels import ChannelShrinking
from .geometry import LayerGeometry, original_cost
from .latency import Latency
from .methods import get, methods_for
from .verify import Comparison


@dataclass(frozen=True)
class LayerReport:
    """One layer. `method` is None when the layer was left as it is (`reason` says why)."""

    name: str
    method: str | None
    ranks: tuple[int, ...] | None  # per group: (R,) for svd/cp, (R_T, R_S) for tucker2
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    rel_error: float  # ||(W1 - W1~) L||^2 / ||W1 L||^2 of the fitted chain, 0 when left as it is
    estimated_error: float | None = None  # the allocation's estimate (an upper bound of rel_error)
    sweeps: int | None = None
    reason: str | None = None
    latency_before: float | None = None  # ms of the layer alone in onnxruntime (with the latency budget)
    latency_after: float | None = None  # ms of its chain, or of the layer when left as it is
    sensitivity: float | None = None  # output error energy per unit of layer error (the allocation's weight)
    op_type: str | None = None  # the layer's node (Conv, Gemm, MatMul)
    # in the budget's total: the decomposable layers (as `inspect` counts them), less those the calibration
    # data could not fit; the others (depthwise convs, say) are listed with their reason
    counted: bool = True
    vectors: int | None = None  # calibration input vectors of the fitted layer
    dims: int | None = None  # ... of this many input dims
    shrinkage: float | None = None  # the OAS weight its second moment was shrunk by (0: as measured)
    held_out_vectors: int | None = None  # vectors its rel_error and estimates are measured on (shrunk layers)


@dataclass(frozen=True)
class CompressionReport:
    layers: tuple[LayerReport, ...]
    error_norm: str  # the covariance `rel_error` is measured in: "sigma" (calibration data) or "frobenius"
    budget: str
    target_ratio: float | None
    verification: Comparison | None
    calibration: str | None  # description of the data the statistics came from
    latency: tuple[Latency, ...] = ()
    search: Mapping[str, object] | None = None  # the ratio search (accuracy or speed target): target, ratio, probes
    # the plan checked at its own errors and allocated again (reallocate.py): its rounds, which plan kept
    reallocation: Mapping[str, object] | None = None
    # --propagate: its waves; with data it did not fit on, both models' errors there and which was kept
    propagation: Mapping[str, object] | None = None
    # the node writing each compressed layer's output refit through the activation after it (rectify.py)
    output_refit: Mapping[str, object] | None = None
    compensation: Mapping[str, object] | None = None  # the kept layers refit after compressed ones (compensate.py)
    folded_pads: tuple[str, ...] = ()  # explicit zero Pads folded into the convs after them (padding.py)
    shrunk_producers: tuple[str, ...] = ()  # layers computing only the channels a pruned layer reads (channels.py)
    seconds: Mapping[str, float] = field(default_factory=dict)  # wall time per stage, and in total
    cpu_seconds: Mapping[str, float] = field(default_factory=dict)  # CPU time (all threads) per stage
    peak_rss_gib: Mapping[str, float] = field(default_factory=dict)  # peak memory by the end of each stage
    settings: Mapping[str, object] = field(default_factory=dict)
    # the whole model: every initializer's elements and the serialized size, before and after
    model_totals: Mapping[str, int] = field(default_factory=dict)
    # the allocation's trade-off curve without fitting: ratio, params and MACs kept, predicted output error
    estimated_curve: tuple[Mapping[str, float], ...] = ()
    # what the sensitivities predict for this model's fits (`predicted_output_error`), None without them
    predicted_output_error: float | None = None

    @property
    def totals(self) -> dict[str, float]:
        keys = ("params_before", "params_after", "macs_before", "macs_after")
        counted = [layer for layer in self.layers if layer.counted]
        totals = {key: sum(getattr(layer, key) for layer in counted) for key in keys}
        totals["layers"] = len(counted)  # the decomposable layers counted (inspect's set, less unfittable ones)
        timed = [layer for layer in counted if layer.latency_before is not None]
        if timed:
            totals["latency_before"] = sum(layer.latency_before for layer in timed)
            totals["latency_after"] = sum(layer.latency_after for layer in timed)
        return totals

    @property
    def ratio(self) -> float:
        """The size reached, in the budget's unit, relative to before."""
        totals = self.totals
        before = totals.get(f"{self.budget}_before", 0)
        return totals[f"{self.budget}_after"] / before if before > 0 else 1.0

    @property
    def compressed(self) -> tuple[LayerReport, ...]:
        return tuple(layer for layer in self.layers if layer.method is not None)

    def to_dict(self) -> dict:
        verification = None
        if self.verification is not None:
            verification = self.verification.to_dict()
        return {
            "layers": [asdict(layer) | {"ranks": list(layer.ranks) if layer.ranks else None} for layer in self.layers],
            "totals": self.totals,
            "model": dict(self.model_totals),
            "ratio": {"budget": self.budget, "target": self.target_ratio, "reached": self.ratio},
            "verification": verification,
            "latency": [asdict(item) for item in self.latency],
            "search": self.search,
            "reallocation": self.reallocation,
            "propagation": self.propagation,
            "output_refit": self.output_refit,
            "compensation": self.compensation,
            "folded_pads": list(self.folded_pads),
            "shrunk_producers": list(self.shrunk_producers),
            "error_norm": self.error_norm,
            "calibration": self.calibration,
            "seconds": dict(self.seconds),
            "cpu_seconds": dict(self.cpu_seconds),
            "peak_rss_gib": dict(self.peak_rss_gib),
            "settings": dict(self.settings),
            "estimated_curve": list(self.estimated_curve),
            "predicted_output_error": self.predicted_output_error,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, default=jsonable)

    def table(self) -> str:
        """Per-layer table with totals, and the verification line."""
        header = (
            "layer",
            "method",
            "ranks",
            "params",
            "",
            "MACs",
            "",
            f"rel.err ({self.error_norm})",
            "sensitivity",
            "layer ms",
            "",
        )
        rows = [header]
        for layer in self.layers:
            rows.append(
                (
                    layer.name,
                    layer.method or "-",
                    "x".join(map(str, layer.ranks)) if layer.ranks else "",
                    f"{layer.params_before:,}",
                    f"-> {layer.params_after:,}",
                    f"{layer.macs_before:,}",
                    f"-> {layer.macs_after:,}",
                    f"{layer.rel_error:.4g}" if layer.method else "",
                    f"{layer.sensitivity:.3g}" if layer.sensitivity is not None else "",
                    _timing(layer),
                    layer.reason or "",
                )
            )
        totals = self.totals
        counted_layers = [layer for layer in self.layers if layer.counted]
        rows.append(
            (
                "total",
                f"{len(self.compressed)} of {len(counted_layers)}",
                "",
                f"{totals['params_before']:,}",
                f"-> {totals['params_after']:,}",
                f"{totals['macs_before']:,}",
                f"-> {totals['macs_after']:,}",
                "",
                "",
                "",
                "",
            )
        )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        rule = "-" * (sum(widths[:-1]) + 2 * (len(widths) - 1))  # the reasons (last column) run on
        lines.insert(1, rule)
        lines.insert(len(lines) - 1, rule)
        p_ratio = totals["params_after"] / max(totals["params_before"], 1)
        m_ratio = totals["macs_after"] / max(totals["macs_before"], 1)
        kept = f"params kept {p_ratio:.1%}, MACs kept {m_ratio:.1%}"
        if "latency_before" in totals:
            kept += f", summed layer latency kept {totals['latency_after'] / totals['latency_before']:.1%}"
        lines.append(
            f"{kept} (target {self.budget} ratio {self.target_ratio} of the {len(counted_layers)} decomposable "
            f"layers counted: {_kinds(counted_layers)}{_left_out(self.layers)})"
        )
        if self.model_totals:
            model = self.model_totals
            lines.append(
                f"whole model: {model['params_before']:,} -> {model['params_after']:,} parameters "
                f"({model['params_after'] / max(model['params_before'], 1):.1%}), {model['bytes_before'] / 1e6:.2f} MB "
                f"-> {model['bytes_after'] / 1e6:.2f} MB ({model['bytes_after'] / max(model['bytes_before'], 1):.1%})"
            )
        shrunk = [layer for layer in self.layers if layer.shrinkage]
        if shrunk:
            lines.append(
                "second moments shrunk where vectors are few (by the OAS weight, or the one held-out vectors chose): "
                + ", ".join(f"{r.name} {r.vectors} vectors / {r.dims} dims, weight {r.shrinkage:.3f}" for r in shrunk)
                + "".join(
                    f"; {r.name}'s errors measured on {r.held_out_vectors} held-out vectors"
                    for r in shrunk
                    if r.held_out_vectors
                )  # fmt: skip
            )
        if self.search:
            lines.append(
                f"ratio search: {self.search['target']} met at ratio {self.search['ratio']:.4f} "
                f"after {len(self.search['probes'])} probes"
            )
        lines.append(verification_line(self.verification))
        if self.predicted_output_error is not None:
            lines.append(
                f"predicted relative output error {self.predicted_output_error:.4f} (the layers' fit errors weighted "
                "by their sensitivities, added as if independent; without compensation)"
            )
        if self.reallocation:
            item = self.reallocation
            tries = "; ".join(
                ", ".join(
                    ("free" if t["reach"] is None else f"within {t['reach']:g}x")
                    + (f" {t['output_error']:.4g}" if t["moved"] else " the same plan") for t in r["tries"]
                ) for r in item["rounds"]
            )  # fmt: skip
            lines.append(
                f"reallocation: output error energy {item['output_error']:.4g} at the first plan (predicted "
                f"{item['predicted']:.4g}); {tries}: kept the {item['kept']} plan"
                + (f" ({len(item['moved'])} layers moved)" if item["kept"] == "reallocated" else "")
                + (f" (the reallocated one ran at {item['too_slow']:.3f} of the original's time)" if "too_slow" in item
                   else "")
            )  # fmt: skip
        if self.propagation and "waves" in self.propagation:
            waves = self.propagation["waves"]
            lines.append(f"--propagate: propagated fits kept in {waves['propagated_waves']} of {waves['waves']} waves")
        if self.propagation and "kept" in self.propagation:
            errors, (low, high) = self.propagation["output_error"], self.propagation["difference_interval"]
            lines.append(
                f"--propagate: output error energy {errors['propagated']:.4f} with the wave choices, "
                f"{errors['plain']:.4f} all plain (refits included) on {self.propagation['samples']} samples neither "
                f"was fitted on, difference [{low:+.4f}, {high:+.4f}]: kept the {self.propagation['kept']} fit"
            )
        if self.shrunk_producers:
            lines.append(
                f"{len(self.shrunk_producers)} layer(s) compute only the channels the pruned layers after them read "
                "(their Gathers removed)"
            )
        if self.folded_pads:
            lines.append(
                f"{len(self.folded_pads)} explicit zero Pad(s) folded into the convs after them (the same function; "
                "onnxruntime runs such a Pad outside its blocked layout)"
            )
        if self.output_refit and self.output_refit["waves"]:
            errors = [wave["output_error"] for wave in self.output_refit["waves"]]
            lines.append(
                f"chain outputs: {self.output_refit['refitted']} of {self.output_refit['layers']} refit through the "
                f"activation after them (output error {errors[0][0]:.4g} -> {errors[-1][1]:.4g} on the judge's samples)"
                + ("; not kept: the model without refits meets the target, the refit one does not"
                   if self.output_refit.get("kept") is False else "")
            )  # fmt: skip
        if self.compensation:
            errors = [wave["output_error"] for wave in self.compensation["waves"]]
            lines.append(
                f"compensation: {self.compensation['refitted']} of {self.compensation['layers']} kept layers after "
                f"compressed ones refit (output error {errors[0][0]:.4g} -> {errors[-1][1]:.4g} on the judge's samples)"
                + ("; not kept: the model without refits meets the target, the refit one does not"
                   if self.compensation.get("kept") is False else "")
            )  # fmt: skip
        for item in self.latency:
            lines.append(latency_line(item, m_ratio))
        return "\n".join(lines)


def _timing(layer: LayerReport) -> str:
    """The layer's time alone and its chain's (`--layer-timings`, `--budget latency`), in ms."""
    if layer.latency_before is None:
        return ""
    return f"{layer.latency_before:.3f} -> {layer.latency_after:.3f}"


def _kinds(layers: Sequence[LayerReport]) -> str:
    kinds: dict[str, int] = {}
    for layer in layers:
        kinds[layer.op_type] = kinds.get(layer.op_type, 0) + 1
    return ", ".join(f"{count} {kind}" for kind, count in kinds.items() if kind) or "none"


def _left_out(layers: Sequence[LayerReport]) -> str:
    """The layers outside the total, in few words: how many of which op, and why."""
    groups: dict[tuple, int] = {}
    for layer in layers:
        if not layer.counted:
            reason = layer.reason or "not decomposable"
            why = "too few calibration vectors" if "calibration vectors" in reason else reason.split(":")[0]
            key = (layer.op_type, why.split(" (")[0])
            groups[key] = groups.get(key, 0) + 1
    parts = [f"{count} {kind} ({why})" for (kind, why), count in groups.items()]
    return f"; not counted: {', '.join(parts)}" if parts else ""


def model_totals(before, after) -> dict[str, int]:
    """Parameters (every initializer's elements) and serialized bytes of two ModelProtos."""
    params = [sum(math.prod(init.dims) for init in model.graph.initializer) for model in (before, after)]
    return {
        "params_before": params[0], "params_after": params[1],
        "bytes_before": before.ByteSize(), "bytes_after": after.ByteSize(),
    }  # fmt: skip


def fitted_row(name: str, geometry: LayerGeometry, choice, fit) -> LayerReport:
    """The row of a layer replaced by its chain (`choice`: the plan's candidate, `fit`: its LayerFit)."""
    before = original_cost(geometry)
    # a refitted bias on a layer that had none adds T parameters to the chain
    with_bias = replace(geometry, bias=geometry.bias or fit.bias is not None)
    after = get(choice.method).cost(with_bias, choice.ranks)
    return LayerReport(
        name=name,
        method=choice.method,
        ranks=tuple(int(r) for r in choice.ranks),
        params_before=before.params,
        params_after=after.params,
        macs_before=before.macs,
        macs_after=after.macs,
        rel_error=fit.rel_error,
        estimated_error=None if math.isnan(choice.error) else choice.error,
        sweeps=fit.sweeps,
    )


def kept_row(name: str, geometry: LayerGeometry, reason: str) -> LayerReport:
    cost = original_cost(geometry)
    return LayerReport(name, None, None, cost.params, cost.params, cost.macs, cost.macs, 0.0, reason=reason)


def sliced_rows(rows, layers: Mapping, coupled: Mapping, plan, shrinking: ChannelShrinking) -> tuple[LayerReport, ...]:
    """`rows` with each layer that computes a pruned layer's input channels (`coupled`: pruned layer -> such
    layers) and was sliced to them (`shrinking.shrunk`), and each depthwise conv sliced with it
    (`shrinking.along`), at the cost of computing only those channels (in proportion: weights, bias and MACs
    are per output channel)."""
    channels = {}
    for consumer, producers in coupled.items():
        choice = plan.get(consumer)
        for producer in producers:
            if choice is not None and producer in shrinking.shrunk:
                channels[producer] = (consumer, choice.ranks[0])
    sliced = []
    for row in rows:
        source = row.name if row.name in channels else shrinking.along.get(row.name)
        if source in channels:
            consumer, count = channels[source]
            kept = f"computes only the {count} channels {consumer} reads"
            total = layers[row.name].geometry.out_channels
            row = replace(
                row, params_after=row.params_before * count // total, macs_after=row.macs_before * count // total,
                reason=kept if source == row.name else f"{row.reason}; {kept}",
                latency_after=None if row.latency_before is None else row.latency_before * count / total,
            )  # fmt: skip
        sliced.append(row)
    return tuple(sliced)


def kept_reason(geometry: LayerGeometry, method: str, budget: str, ratio: float | None) -> str:
    """Why a layer the plan left alone was kept: no budget (only --ranks), no cheaper chain, or not needed."""
    if ratio is None:
        return "not named in --ranks"
    original = original_cost(geometry)
    methods = methods_for(method, geometry)
    smallest = [get(m).cost(geometry, (1,) * get(m).rank_count) for m in methods]
    if all(cost.of(budget) >= original.of(budget) for cost in smallest):
        return f"no {'/'.join(methods)} chain has fewer {budget}"
    return "kept: budget met without it"


def predicted_output_error(errors: Mapping[str, float], sensitivity: Mapping[str, float]) -> float:
    """The relative output error the allocation's model predicts: sqrt(sum of each layer's sensitivity times
    its relative error), the layers' errors adding up independently at the output (`errors`: squared relative
    errors; a layer without a measured sensitivity counts at 1)."""
    return math.sqrt(sum(sensitivity.get(name, 1.0) * error for name, error in errors.items() if not math.isnan(error)))


def layer_rows(
    layers: Sequence,
    plan,
    fits: Mapping,
    reasons: Mapping[str, str],
    *,
    method: str,
    budget: str,
    ratio: float | None,
    sensitivity: Mapping[str, float] | None = None,
    timed: Callable | None = None,
    counted: Iterable[str] | None = None,
    sampling: Callable | None = None,
) -> tuple[LayerReport, ...]:
    """The report rows of every layer of known size, in graph order: fitted ones with their chain, the others
    with the reason they were kept. `timed(row, choice)` adds measured latencies (the latency budget);
    `counted` names the layers in the budget's total (default: all); `sampling(name)` gives a fitted layer's
    calibration vectors, input dims and shrinkage (`problems.Problems.sampling`)."""
    counted = None if counted is None else set(counted)
    rows = []
    for layer in layers:
        if layer.geometry is None:
            continue
        choice = plan.get(layer.name) if layer.name in fits else None
        if choice is not None:
            row = fitted_row(layer.name, layer.geometry, choice, fits[layer.name])
        else:
            reason = reasons.get(layer.name) or kept_reason(layer.geometry, method, budget, ratio)
            row = kept_row(layer.name, layer.geometry, reason)
        row = timed(row, choice) if timed is not None else row
        if sampling is not None and layer.name in fits and (known := sampling(layer.name)) is not None:
            row = replace(row, vectors=known[0], dims=known[1], shrinkage=known[2], held_out_vectors=known[3])
        rows.append(
            replace(
                row,
                sensitivity=(sensitivity or {}).get(layer.name),
                op_type=layer.op_type,
                counted=counted is None or layer.name in counted,
            )
        )
    return tuple(rows)


def summary_figures(report: CompressionReport) -> dict:
    """A run in one row: parameters and MACs kept (counted layers), the whole model's parameters and bytes,
    the held-out accuracy figures with their 95 % intervals (`_low`, `_high`), latency ratios per batch."""
    totals, model, verification = report.totals, report.model_totals, report.verification
    row = {
        "params": totals["params_after"] / max(totals["params_before"], 1),
        "macs": totals["macs_after"] / max(totals["macs_before"], 1),
        "model_params": model.get("params_after"),
        "model_bytes": model.get("bytes_after"),
        "rel_output_error": verification.rel_output_error if verification else None,
        "top1_agreement": verification.top1_agreement if verification else None,
        "top1": verification.top1_compressed if verification else None,
        "samples": verification.samples if verification else None,
    }
    if verification is not None:
        classifier = verification.classifier
        intervals = {
            "rel_output_error": verification.worst_output.rel_error_interval,
            "top1_agreement": classifier.top1_agreement_interval if classifier else None,
            "top1": classifier.top1_compressed_interval if classifier else None,
        }
        for key, interval in intervals.items():
            if interval is not None:
                row[f"{key}_low"], row[f"{key}_high"] = interval
    for latency in report.latency:
        key = f"latency_b{latency.batch}"
        row[key], row[f"{key}_low"], row[f"{key}_high"] = latency.ratio, latency.ratio_low, latency.ratio_high
    return row


def verification_line(comparison: Comparison | None) -> str:
    """One line per model output: relative error, cosine, SNR; top-1 figures for class-score outputs; each
    with its 95 % interval in brackets."""
    if comparison is None:
        return "verification: none (no data to compare the models on)"
    if comparison.in_sample:
        lines = [
            f"verification IN-SAMPLE on {comparison.samples} calibration samples (no held-out data: optimistic; "
            f"--eval-data SOURCE or more data with --holdout N checks on other data):"
        ]
    else:
        lines = [f"verification on {comparison.samples} held-out samples (95% intervals in brackets):"]
    for output in comparison.outputs:
        text = (
            f"  output {output.name}: relative error {output.rel_error:.4f}{_interval(output.rel_error_interval)}, "
            f"cosine {output.cosine:.4f}, SNR {output.snr_db:.1f} dB"
        )
        if output.top1_agreement is not None:
            text += f", top-1 agreement {output.top1_agreement:.2%}{_interval(output.top1_agreement_interval, True)}"
        if output.top1_original is not None:
            text += (
                f", top-1 {output.top1_original:.2%} -> {output.top1_compressed:.2%}"
                f"{_interval(output.top1_compressed_interval, True)}, drop "
                f"{100 * (output.top1_original - output.top1_compressed):.2f} points"
                f"{_interval(output.top1_drop_interval and tuple(100 * v for v in output.top1_drop_interval))}"
            )
            text += f" (labels: {comparison.labels_from})" if comparison.labels_from else ""
        lines.append(text)
    return "\n".join(lines)


def _interval(interval, percent: bool = False) -> str:
    if not interval:
        return ""
    low, high = interval
    return f" [{low:.2%}, {high:.2%}]" if percent else f" [{low:.4g}, {high:.4g}]"


def latency_line(latency: Latency, macs_kept: float | None = None) -> str:
    text = latency.describe() + (f", MAC ratio {macs_kept:.3f}" if macs_kept is not None else "")
    if latency.compressed_threads not in (0, latency.threads):  # the figure holds where it runs on those threads
        text += f"; run the compressed model with intra_op_num_threads={latency.compressed_threads}"
    if not latency.faster:
        verdict = "not measurably faster" if latency.ratio_low < 1.0 else "SLOWER than the original"
        text += f"; {verdict}: --speedup X (e.g. 1.3) asks for a model that is X times faster, measured"
    return text


def jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
