"""Accuracy targets (`--max-drop`, `--min-agreement`): the smallest global ratio whose model meets the
target on held-out data, by bisection; and the order in which verified results are preferred."""

from __future__ import annotations

from collections.abc import Callable

from .config import PlanConfig
from .errors import UserError
from .latency import Latency
from .log import logger
from .verify import Comparison

SEARCH_PROBES = 10  # bisection steps at most
SEARCH_TOLERANCE = 0.01  # ... stopping once the bracket is this narrow
SPEED_TOLERANCE = 0.02  # the speed search's bracket: timings are noisier than accuracies
# a missed probe at half the ratio of the miss before it, whose time is within this share of that one's, ends a
# search that met nothing: the time no longer follows the layers' arithmetic (on an H200, ResNet-56 ran 1.49x
# the original's time at half its MACs, its cost being per node), so smaller ratios only lose accuracy
SATURATION = 0.02


def meets(comparison: Comparison | None, config: PlanConfig) -> bool:
    """Whether the target holds on the pessimistic end of the figure's 95 % interval: the held-out set is a
    sample, and the target is meant for the data the model will see."""
    if comparison is None:
        return False
    if config.max_drop is not None:
        return comparison.top1_drop_high is not None and 100 * comparison.top1_drop_high <= config.max_drop
    if config.max_error is not None:
        return error_bound(comparison, config) <= config.max_error
    return comparison.top1_agreement_low is not None and comparison.top1_agreement_low >= config.min_agreement


def error_of(comparison: Comparison, config: PlanConfig) -> float:
    """The relative output error --max-error bounds: of --target-output, else of the worst output."""
    if config.target_output is not None:
        return comparison.output(config.target_output).rel_error
    return comparison.rel_output_error


def error_bound(comparison: Comparison, config: PlanConfig) -> float:
    """The upper end of that error's 95 % interval."""
    if config.target_output is not None:
        output = comparison.output(config.target_output)
        return output.rel_error_interval[1] if output.rel_error_interval else output.rel_error
    return comparison.rel_output_error_high


def preference(comparison: Comparison, config: PlanConfig) -> tuple:
    """Order of held-out results: meeting the search target first, then top-1 agreement (of a classifier),
    then output error."""
    agreement = comparison.top1_agreement if comparison.top1_agreement is not None else 0.0
    return (not config.targeted or meets(comparison, config), agreement, -error_of(comparison, config))


def target_text(config: PlanConfig) -> str:
    if config.max_drop is not None:
        return f"top-1 drop <= {config.max_drop} points (upper end of its 95% interval)"
    if config.max_error is not None:
        output = config.target_output or "every output"
        return f"relative output error of {output} <= {config.max_error} (upper end of its 95% interval)"
    return f"top-1 agreement >= {config.min_agreement} (lower end of its 95% interval)"


def smallest_ratio(probe: Callable[[float], Comparison], config: PlanConfig) -> tuple[float, dict]:
    """The smallest ratio whose model meets the target; `probe(ratio)` builds and verifies that model (the
    caller reuses statistics, candidate tables and fits, so a probe is one rewrite and one evaluation).
    Returns the ratio and the search record (target, ratio, every probe)."""
    probes = []
    low, high = 0.0, 1.0  # ratio 1 keeps every layer: it meets any target
    for _ in range(SEARCH_PROBES):
        ratio = (low + high) / 2
        comparison = probe(ratio)
        if config.max_drop is not None and comparison.top1_drop is None:
            raise UserError(
                "--max-drop needs labeled data (class folders, .npz with labels) and a class-score output; "
                "use --min-agreement, or --max-error for any model"
            )
        if config.min_agreement is not None and comparison.top1_agreement is None:
            raise UserError(
                "--min-agreement needs a class-score output ([N, C], or --classifier-output NAME); use --max-error"
            )
        met = meets(comparison, config)
        error, bound = error_of(comparison, config), error_bound(comparison, config)
        probes.append({
            "ratio": ratio, "top1_drop": comparison.top1_drop, "top1_drop_high": comparison.top1_drop_high,
            "top1_agreement": comparison.top1_agreement, "top1_agreement_low": comparison.top1_agreement_low,
            "rel_output_error": error, "rel_output_error_high": bound, "met": met,
        })  # fmt: skip
        logger.info(
            "probe at ratio %.4f: top-1 agreement %s, top-1 drop %s, relative output error %.4f (<= %.4f): %s",
            ratio,
            "n/a" if comparison.top1_agreement is None
            else f"{comparison.top1_agreement:.4f} (>= {comparison.top1_agreement_low:.4f})",
            "n/a" if comparison.top1_drop is None
            else f"{100 * comparison.top1_drop:.2f} points (<= {100 * comparison.top1_drop_high:.2f})",
            error, bound, "meets the target" if met else "misses it",
        )  # fmt: skip
        low, high = (low, ratio) if met else (ratio, high)
        if high - low < SEARCH_TOLERANCE:
            break
    target = target_text(config)
    logger.info("ratio search: %s met at ratio %.4f after %d probes", target, high, len(probes))
    return high, {"target": target, "ratio": high, "probes": probes}


def largest_ratio_at_speed(
    probe: Callable[[float], Latency], speedup: float, faster_whole: bool = False
) -> tuple[float, dict]:
    """The largest ratio (the most accurate model) that is at least `speedup` times faster than the original,
    on the pessimistic end of the measured interval: `probe(ratio)` builds that model and times it against the
    original (`latency.compare_latency`). `faster_whole`: ratio 1, every layer kept, may be faster already
    (explicit Pads folded), and is probed first. Returns the ratio and the search record (target, every probe)."""
    probes, best, saturated = [], None, None
    low, high = 0.0, 1.0  # ratio 1 keeps every layer: no faster than the original, unless `faster_whole`
    for step in range(SEARCH_PROBES):
        ratio = 1.0 if faster_whole and step == 0 else (low + high) / 2
        latency = probe(ratio)
        met = latency.ratio_high <= 1 / speedup
        probes.append({
            "ratio": ratio, "latency_ratio": latency.ratio, "interval": [latency.ratio_low, latency.ratio_high],
            "speedup": 1 / latency.ratio, "batch": latency.batch, "met": met,
        })  # fmt: skip
        logger.info(
            "probe at ratio %.4f: %.2fx faster at batch %d (latency ratio %.3f [%.3f, %.3f]): %s",
            ratio, 1 / latency.ratio, latency.batch, latency.ratio, latency.ratio_low, latency.ratio_high,
            "meets the target" if met else "misses it",
        )  # fmt: skip
        if met:
            low, best = ratio, ratio
        elif best is None and len(probes) > 1 and latency.ratio >= probes[-2]["latency_ratio"] * (1 - SATURATION):
            saturated = probes[-2], probes[-1]  # with nothing met, the probe before was a miss too
            break
        else:
            high = ratio
        if high - low < SPEED_TOLERANCE or best == 1.0:
            break
    target = f"{speedup}x faster at batch {probes[0]['batch']}"
    if best is None:
        fastest = max(probes, key=lambda item: item["speedup"])
        reached = (
            f"--speedup {speedup} not reached: the fastest model probed (ratio {fastest['ratio']:.4f}) ran "
            f"{fastest['speedup']:.2f}x faster at batch {fastest['batch']}"
        )
        if saturated:
            larger, smaller = saturated
            raise UserError(
                f"{reached}, and ratio {smaller['ratio']:.4f} took {smaller['latency_ratio']:.3f} of the original's "
                f"time where ratio {larger['ratio']:.4f} took {larger['latency_ratio']:.3f}: smaller ranks no longer "
                f"make this model faster on this provider (its time goes to per-node costs, not arithmetic)"
            )
        raise UserError(f"{reached}; ask for less, or try --budget latency")
    logger.info("speed search: %s met at ratio %.4f after %d probes", target, best, len(probes))
    return best, {"target": target, "ratio": best, "probes": probes}


def closing_measurement(search: dict, latencies, speedup: float, batch: int) -> dict:
    """The speed search's record with the written model's closing measurement at the target's batch, and a
    warning where it misses the speed-up the search's probe met: the machine's speed drifts between two
    measurements minutes apart (ResNet-56 `--speedup 1.25` on a shared 2-core machine: the probe met 0.8 on
    its pessimistic end, the closing measurement gave 0.852 [0.831, 0.876])."""
    closing = next((item for item in latencies if item.batch == batch), None)
    if closing is None:
        return search
    met = closing.ratio_high <= 1 / speedup
    if not met:
        logger.warning(
            "the written model measured %.3f [%.3f, %.3f] of the original's time at batch %d, which misses the "
            "%gx its probe met: the machine's speed changed between the two measurements; measure it again "
            "(onnx-dacomp evaluate --benchmark) or ask for a little more (--speedup)",
            closing.ratio, closing.ratio_low, closing.ratio_high, batch, speedup,
        )  # fmt: skip
    return {**search, "closing": {"latency_ratio": closing.ratio, "interval": [closing.ratio_low, closing.ratio_high],
                                  "met": met}}  # fmt: skip
