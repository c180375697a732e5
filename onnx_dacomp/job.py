"""Everything a model at some ratio is built from, computed once (`prepare.prepare`: statistics, problems,
candidate tables, sensitivities): `CompressionJob.result(ratio)` plans, fits, rewrites, verifies and reports
one model; `pipeline.compress` asks for one ratio (or searches for it), `sweep.sweep` for several, and both
give the same model at the same ratio since they run the same code on the same shared parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import onnx

from .cache import Cache
from .calibration.sources import Source, rereadable
from .calibration.statistics import Statistics
from .channels import ChannelShrinking, shrink_producers
from .classes import class_producers
from .compensate import compensate, downstream
from .config import CompressConfig
from .errors import UserError
from .fit import FitSettings, fit_all
from .layers import Layer
from .log import StageClock, logger
from .methods import get
from .padding import fold_pads
from .propagate import OutputError, fit_propagated, keep_better
from .ranks.candidates import CandidateTable
from .ranks.plan import Budget, RankPlan, plan, sliced
from .reallocate import FIRST_REACH, ROUNDS, corrected_weights, layer_shares, within_reach
from .rectify import refit_outputs
from .report import CompressionReport, layer_rows, model_totals, predicted_output_error, sliced_rows
from .rewrite import replace_layers, with_provenance
from .search import closing_measurement, meets
from .sensitivity import probe_batches, probe_samples
from .speed import LatencyTable, LayerCosts, faster_realizations, keep_faster
from .targets import MAX_VECTOR_LENGTH, TargetScan, find_targets, read_biases, read_weights
from .verify import compare_models, end_to_end_latency, warn_if_lost
from .workers import Workers

# a speed probe whose narrow interval still straddles the target is timed on, up to this many times
# --benchmark-seconds: the pessimistic end of its interval decides, and on 10 s ResNet-56's `--speedup 1.6
# --speedup-batch 32` probes spanned up to 0.09 (ratio 0.3125: [0.540, 0.629], missed) and the search settled at
# MACs 0.297 (81.46 %); on 30 s at most 0.04, but `--speedup 1.3`'s 0.3125 probe still ended at 0.743 [0.720,
# 0.772] against 0.769 and the search settled at MACs 0.310 again
PROBE_SECONDS_FACTOR = 6

JUDGE_SAMPLES = 128  # propagation and compensation choose each wave's fit by the output error on this many samples
UNSEEN_SAMPLES = 1024  # the whole propagated model is checked on this many (every sample of most held-out sets)
IN_SAMPLE_SAMPLES = 500  # without held-out data, the result is compared on this many calibration samples
CURVE_RATIOS = tuple(round(0.05 * step, 2) for step in range(2, 21))  # the estimated trade-off curve's points


def streamlined(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[str, ...], ChannelShrinking]:
    """The same function, faster: `model` with its explicit zero Pads folded into the convs after them (the
    runtime ran them outside its layout) and the Gathers of pruned channels removed by slicing the layers that
    computed them; the Pads folded and the slicing (`shrinking.model` is the model returned)."""
    folding = fold_pads(model)
    shrinking = shrink_producers(folding.model)
    return shrinking.model, folding.folded, shrinking


@dataclass(frozen=True, eq=False)
class CompressionResult:
    model: onnx.ModelProto
    report: CompressionReport
    # the allocation's candidate tables (layer -> ranks, cost, estimated error), for --sensitivity-csv
    tables: dict[str, CandidateTable] = field(default_factory=dict)
    # `auto`'s groups: layer -> (its low-rank and pruned sensitivities, the layers it slices), for the same
    pruned: dict[str, tuple] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Refitted:
    """A compressed model as its chains were fitted and after the refits (`rectify.py`, `compensate.py`), with
    the fits and the refits' records."""

    fitted: onnx.ModelProto
    model: onnx.ModelProto
    fits: dict
    rectification: dict | None
    compensation: dict | None


@dataclass(frozen=True, eq=False)
class CompressionJob:
    """The parts shared by every ratio: model, data split, statistics, problems, candidate tables and
    sensitivities; `fit_cache` keeps each layer's fits across ratios."""

    model: onnx.ModelProto
    config: CompressConfig
    progress: bool
    workers: Workers
    store: Cache | None
    clock: StageClock
    scan: TargetScan
    layers: dict[str, Layer]
    fitted: list
    reasons: dict[str, str]
    calibration: object
    holdout: object
    signature: object
    statistics: Statistics | None
    problems: object
    settings: FitSettings
    timing: LatencyTable
    costs: LayerCosts
    fixed: dict
    pooled: object
    tables: dict[str, CandidateTable]
    sensitivity: dict[str, float] | None
    # `auto`'s groups: the prunable layers' sensitivities probed pruned (`sensitivity.allocation_weights`)
    pruned_sensitivity: dict[str, float] | None
    counted: list[str]
    compensable: list[Layer]  # the layers compensation may refit (targets.refittable), graph order
    input_shapes: dict  # the model inputs' static shapes (to find the layers of a compressed model)
    # without held-out data: (calibration samples to fit on, a fifth set aside to judge fits on), where splittable
    set_aside: tuple | None = None
    fit_cache: dict = field(default_factory=dict)
    # (method, kernel) -> the realization of such chains measured faster in the model (`speed.faster_realizations`)
    realizations: dict = field(default_factory=dict)

    def plan_at(
        self, ratio: float | None, warn: bool = True, weights: tuple | None = None, tables: dict | None = None
    ) -> RankPlan:
        """The rank plan at `ratio`, the layers' errors weighted by `weights` (their sensitivities, and those
        of the pruned candidates of `auto`'s groups; default: as measured), from `tables` (default: all)."""
        options = self.config.plan
        budget = Budget(
            options.budget, ratio, options.allocation, options.method, options.rank_multiple, self.config.runtime.seed
        )
        original_costs = {name: self.costs.original(name) for name in self.counted}
        sensitivity, pruned = weights if weights is not None else (self.sensitivity, self.pruned_sensitivity)
        return plan(
            self.problems, tables or self.tables, budget, original_costs=original_costs, overrides=self.fixed,
            weights=sensitivity, warn=warn, groups=self.groups, pruned_weights=pruned,
        )  # fmt: skip

    def planned(
        self, ratio: float | None, weights: tuple | None = None, tables: dict | None = None
    ) -> tuple[RankPlan, dict[str, str]]:
        """The plan at `ratio` as it is built: where the target is time (--speedup, --budget latency,
        --require-speedup) each chain in its realization measured faster; with --require-speedup, the layers
        whose chain is still not faster kept, with their reasons."""
        options, kept = self.config.plan, {}
        rank_plan = self.plan_at(ratio, weights=weights, tables=tables)
        if options.speedup is not None or options.budget == "latency" or options.require_speedup:
            rank_plan = faster_realizations(rank_plan, self.costs, self.fixed, self.realizations, self.time_ratio)
        if options.require_speedup:
            rank_plan, kept = keep_faster(rank_plan, self.layers, self.timing, self.fixed)
        return rank_plan, kept

    def time_ratio(self, rank_plan: RankPlan, other: RankPlan) -> float:
        """The latency of `other`'s model over `rank_plan`'s, end to end at the batch the target is timed at."""
        options = self.config.plan
        batch = options.speedup_batch if options.speedup is not None else self.timing.batch
        first, second = (streamlined(self.build(plan)[0])[0] for plan in (rank_plan, other))
        seconds = self.config.verify.benchmark_seconds
        return self.timed(second, [batch], False, seconds, baseline=first, threshold=1.0)[0].ratio

    def reallocated(self, ratio: float, rank_plan: RankPlan, kept: dict[str, str]):
        """The plan allocated again with each layer's weight corrected by its measured share of the output error
        (`reallocate.py`), where that model has the lower output error on the judge's samples: allocated freely,
        or where that is no better, with each compressed layer's error kept within reach of the plan's. A kept
        plan is measured and reallocated again, with twice the reach, for `ROUNDS` rounds at most. Returns the
        plan, its kept layers' reasons and the record."""
        weights, reach, rounds, first = (self.sensitivity, self.pruned_sensitivity), FIRST_REACH, [], rank_plan
        for _ in range(ROUNDS):
            replanned, replanned_kept, weights, record = self.reallocation_round(ratio, rank_plan, weights, reach)
            rounds.append(record)
            if replanned is None:
                break
            rank_plan, kept, reach = replanned, replanned_kept, 2 * reach
        moved = [name for name in first.choices if rank_plan.get(name) != first.get(name)]
        final = [record["output_error_reallocated"] for record in rounds if "output_error_reallocated" in record]
        summary = {
            "output_error": rounds[0]["output_error"], "predicted": rounds[0]["predicted"], "moved": moved,
            "output_error_reallocated": final[-1] if final else None, "kept": "reallocated" if final else "first",
            "rounds": rounds,
        }  # fmt: skip
        return rank_plan, kept, summary

    def reallocation_round(self, ratio: float, rank_plan: RankPlan, weights: tuple, reach: float):
        """One round of `reallocated` from `rank_plan`, allocated with `weights` (low-rank and pruned
        sensitivities, as `plan_at` takes them): the new plan and its kept layers' reasons (None where none is
        better), the weights corrected and the round's record."""
        sensitivity, pruned_sensitivity = weights
        pruned = self.probed_pruned(rank_plan.choices)
        used = self.weights_for(rank_plan.choices, weights)
        fits = self.build(rank_plan)[1]
        managed = [name for name in fits if name in self.tables]
        errors = {name: rank_plan.get(name).error for name in managed}
        total, shares = layer_shares(self.model, self.chains(fits), self.share_judge, managed, self.progress)
        scaled = corrected_weights(used, errors, shares)
        corrected = (
            sensitivity | {name: scaled[name] for name in managed if name not in pruned},
            None if pruned_sensitivity is None else pruned_sensitivity | {name: scaled[name] for name in pruned},
        )
        record = {
            "output_error": total, "predicted": sum(used[name] * e for name, e in errors.items()), "shares": shares,
            "factors": {name: scaled[name] / used[name] for name in managed}, "tries": [],
        }  # fmt: skip
        for within in (None, reach):
            tables = None if within is None else within_reach(self.tables, rank_plan, managed, within, self.groups)
            replanned, replanned_kept = self.planned(ratio, corrected, tables)
            moved = [name for name in replanned.choices if replanned.get(name) != rank_plan.get(name)]
            error = self.share_judge(self.build(replanned)[0]) if moved else total
            record["tries"].append({"reach": within, "moved": moved, "output_error": error})
            logger.info(
                "reallocation, %s: %d layers moved, output error %.4g -> %.4g on the judge's samples",
                "free" if within is None else f"within {within:g}x", len(moved), total, error,
            )  # fmt: skip
            if error < total:
                return replanned, replanned_kept, corrected, record | {"output_error_reallocated": error}
        return None, None, corrected, record

    def chains(self, fits) -> dict:
        """The rewrite's chains of `fits`: layer output -> (layer, factors, bias)."""
        return {self.layers[n].output: (self.layers[n], f.factors, f.bias) for n, f in fits.items()}

    def build_propagated(self, rank_plan: RankPlan):
        """The model with the plan's chains fitted on the partially compressed model, wave by wave, each wave
        keeping the propagated or the plain fits by the output error on samples propagation did not see (see
        `judge`); the fits and the record of the waves."""
        if self.calibration is None:
            raise UserError("--propagate needs calibration data (--data): it runs the partially compressed model")
        seen = self.set_aside[0] if self.set_aside is not None else self.calibration
        return fit_propagated(
            self.model, self.fitted, rank_plan, self.problems, self.statistics.layers, list(seen),
            self.settings, bias_refit=self.config.fit.bias_refit, device=self.config.runtime.device,
            show_progress=self.progress, judge=self.judge,
        )  # fmt: skip

    @cached_property
    def judge(self) -> OutputError:
        """The output error by which propagation and compensation choose between fits: on held-out samples;
        without any, on the calibration samples set aside, which propagation's statistics leave out (judged on
        the samples it had fitted, EfficientNet-Lite0's propagated fits won every comparison and lost 0.5 to
        4.6 points of top-1 on other images); where the data cannot be split, on calibration samples (said so)."""
        judged = self.holdout
        if judged is None and self.set_aside is not None:
            judged = self.set_aside[1]
            logger.info("no held-out data: propagation and compensation choose their fits on %d calibration "
                        "samples set aside", min(judged.size, JUDGE_SAMPLES))  # fmt: skip
        elif judged is None:
            logger.info("no held-out data: propagation and compensation choose their fits on calibration samples")
            judged = self.calibration
        return OutputError(self.model, probe_batches(judged, JUDGE_SAMPLES, self.signature), self.config.runtime.device)

    @cached_property
    def share_judge(self) -> OutputError:
        """The judge on as many samples as a sensitivity probe takes (`probe_samples`: fewer for models that
        cost more per sample), for reallocation's one model per compressed layer."""
        macs = [layer.macs for layer in self.layers.values()]
        samples = probe_samples(None if None in macs else sum(macs))
        if samples >= JUDGE_SAMPLES:
            return self.judge
        batches = probe_batches(self.judge.batches, samples, self.signature)
        return OutputError(self.model, batches, self.config.runtime.device)

    @cached_property
    def unseen(self) -> OutputError | None:
        """The output error, and the top-1 agreement of the outputs that score classes, on the samples propagation
        did not fit on (the held-out data, or the calibration samples set aside; `UNSEEN_SAMPLES` at most, held in
        memory), by which the propagated model is kept over the plain one; None where there are none."""
        data = self.holdout if self.holdout is not None else self.set_aside[1] if self.set_aside is not None else None
        if data is None:
            return None
        classes = {name: False for name in class_producers(self.model)}
        classes |= {name: True for name in self.config.verify.classifier_outputs}
        return OutputError(
            self.model, probe_batches(data, UNSEEN_SAMPLES, self.signature), self.config.runtime.device, classes
        )

    def refitted(self, fitted: onnx.ModelProto, fits) -> Refitted:
        """`fitted` (the model of `fits`) with its chains' outputs refit through the activations and the kept
        layers after them compensated."""
        rectified, rectification = self.rectified(fitted, fits)
        model, compensation = self.compensated(rectified, fits)
        return Refitted(fitted, model, fits, rectification, compensation)

    def rectified(self, new_model: onnx.ModelProto, fits) -> tuple[onnx.ModelProto, dict | None]:
        """`new_model` with the node that writes each compressed layer's output refit on the input it gets there,
        through the activation after it (`rectify.py`), and the record; as it is with --no-refit-outputs, with the
        data-free fit (--norm frobenius) or without calibration data."""
        fit = self.config.fit
        if not fit.refit_outputs or fit.norm != "sigma" or self.calibration is None or not rereadable(self.calibration):
            return new_model, None
        originals = {self.layers[name].output: self.layers[name] for name in fits}
        nodes = [
            layer for layer in find_targets(new_model, self.input_shapes).layers
            if layer.output in originals and layer.refittable and layer.geometry is not None
            and layer.geometry.group == 1 and layer.vector_length <= MAX_VECTOR_LENGTH
        ]  # fmt: skip
        if not nodes:
            return new_model, None
        seen = self.set_aside[0] if self.set_aside is not None else self.calibration
        return refit_outputs(
            self.model, new_model, nodes, originals, list(seen), self.judge, length=self.signature.length,
            seed=self.config.runtime.seed, device=self.config.runtime.device, show_progress=self.progress,
        )  # fmt: skip

    def compensated(self, new_model: onnx.ModelProto, fits) -> tuple[onnx.ModelProto, dict | None]:
        """`new_model` with the kept layers downstream of the compressed ones (`fits`; with `--compensate tail`
        only those after every compressed layer) refit on the input they get there (`compensate.py`), and the
        record; as it is without calibration data or such layers."""
        mode = self.config.fit.compensate
        if mode == "none" or self.calibration is None or not rereadable(self.calibration):
            return new_model, None
        compressed = [self.layers[name] for name in fits]
        kept = [layer for layer in self.compensable if layer.name not in fits]
        layers = downstream(self.model, kept, [layer.output for layer in compressed])
        if mode == "tail":  # no compressed layer after them: their refit faces all the error there is
            layers = [layer for layer in layers if not downstream(self.model, compressed, [layer.output])]
        if not layers:
            return new_model, None
        return compensate(
            self.model, new_model, layers, read_weights(self.model, layers), read_biases(self.model, layers),
            list(self.calibration), self.judge, length=self.signature.length, device=self.config.runtime.device,
            show_progress=self.progress,
        )  # fmt: skip

    def build(self, rank_plan: RankPlan):
        """The model with the plan's chains fitted, and the fits."""
        fits = fit_all(
            self.problems, rank_plan.choices, self.settings, map=self.pooled, cache=self.fit_cache, store=self.store,
            show_progress=self.progress,
        )  # fmt: skip
        return replace_layers(self.model, self.chains(fits)), fits

    def timed(self, candidate: onnx.ModelProto, sizes, show: bool, seconds: float, baseline=None, threshold=None):
        """`candidate` timed against `baseline` (the original), end to end, at each batch size in `sizes`
        (until decided against `threshold` where one is given)."""
        source, runtime = self.holdout or self.calibration, self.config.runtime
        baseline = self.model if baseline is None else baseline
        return end_to_end_latency(
            baseline, candidate, source, sizes, self.signature, runtime, show, seconds, threshold=threshold
        )

    def speed_probe(self, rank_plan: RankPlan):
        """The model of `rank_plan` (streamlined, as it would be written) timed against the original at the speed
        target's batch, until decided against the target."""
        options = self.config.plan
        seconds = PROBE_SECONDS_FACTOR * self.config.verify.benchmark_seconds
        model = streamlined(self.build(rank_plan)[0])[0]
        return self.timed(model, [options.speedup_batch], False, seconds, threshold=1 / options.speedup)[0]

    def verify(self, candidate: onnx.ModelProto, show: bool | None = None, source=None):
        return compare_models(
            self.model, candidate, source or self.holdout, device=self.config.runtime.device,
            progress=self.progress if show is None else show, signature=self.signature,
            classifier_outputs=self.config.verify.classifier_outputs,
        )  # fmt: skip

    def check(self, candidate: onnx.ModelProto):
        """The comparison on the held-out data; without any, on (up to IN_SAMPLE_SAMPLES of) the calibration
        data, marked in-sample; None where not even that can be read again."""
        if self.holdout is not None:
            return self.verify(candidate)
        calibration = self.calibration
        if not rereadable(calibration):
            return None
        size = getattr(calibration, "size", None)
        if isinstance(calibration, Source) and size is not None and type(calibration).subset is not Source.subset:
            calibration = calibration.subset(0, min(size, IN_SAMPLE_SAMPLES))
        return replace(self.verify(candidate, source=calibration), in_sample=True)

    def probed_pruned(self, choices) -> set[str]:
        """The layers `choices` prune whose pruned probe (`auto`'s groups) measures them."""
        measured = self.pruned_sensitivity or {}
        return {n for n, c in choices.items() if c is not None and get(c.method).prunes_inputs and n in measured}

    def weights_for(self, choices, weights: tuple | None = None) -> dict[str, float] | None:
        """Each layer's sensitivity as its choice is measured: the pruned probe's where `auto` prunes it; from
        `weights` (low-rank and pruned, as `plan_at` takes them; default: as measured)."""
        sensitivity, pruned = weights if weights is not None else (self.sensitivity, self.pruned_sensitivity)
        if sensitivity is None:
            return None
        return sensitivity | {name: pruned[name] for name in self.probed_pruned(choices)}

    @property
    def pruned_probes(self) -> dict[str, tuple]:
        """Layer -> (low-rank sensitivity, pruned sensitivity, the layers computing its input channels), for
        the layers of `auto`'s groups probed pruned (`exports.sensitivity_rows`)."""
        measured = self.pruned_sensitivity or {}
        return {name: (self.sensitivity[name], measured[name], self.costs.coupled[name]) for name in measured}

    @property
    def groups(self) -> dict[str, tuple[str, ...]] | None:
        """The layers `auto` allocates together: a prunable layer and those computing its input channels."""
        return self.costs.coupled if self.costs.joint else None

    @property
    def reallocatable(self) -> bool:
        """Whether the plan is reallocated at the final ratio: allocated from sensitivities, with data the fits
        did not see to measure the layers' shares on (held-out, or calibration samples set aside)."""
        return (
            self.config.plan.reallocate and self.sensitivity is not None and bool(self.tables)
            and (self.holdout is not None or self.set_aside is not None)
        )  # fmt: skip

    def _settings(self, ratio) -> dict:
        return {k: v for k, v in self.config.options().items() if k != "input_shapes"} | {"ratio": ratio}

    @cached_property
    def estimated_curve(self) -> tuple[dict, ...]:
        """The allocation's own trade-off curve, without fitting: at each ratio of CURVE_RATIOS, the counted
        layers' params and MACs kept and the output error the sensitivities predict, sqrt(sum of sensitivity
        times estimated layer error) (empty without candidate tables or measured sensitivities: a sum of
        unweighted layer errors predicts no output error)."""
        if not self.tables or self.sensitivity is None:
            return ()
        curve = []
        for ratio in CURVE_RATIOS:
            chosen = self.plan_at(ratio, warn=False).choices  # the curve's low end may lie out of reach
            errors = {name: choice.error for name, choice in chosen.items() if choice is not None}
            curve.append({
                "ratio": ratio, "params": self.kept_share(chosen, "params"), "macs": self.kept_share(chosen, "macs"),
                "estimated_output_error": predicted_output_error(errors, self.weights_for(chosen)),
            })  # fmt: skip
        return tuple(curve)

    def kept_share(self, choices, unit: str) -> float:
        """The share of the counted layers' cost in `unit` (params, macs, latency) that `choices` keep."""
        inside = sliced(choices, self.groups)
        before = sum(self.costs.original(name).of(unit) for name in self.counted)
        after = sum(
            (choice.cost if (choice := choices.get(name)) else self.costs.original(name)).of(unit)
            for name in self.counted if name not in inside
        )  # fmt: skip
        return after / before if before else 1.0

    def result(self, ratio: float | None, search: dict | None = None) -> CompressionResult:
        """The compressed model at `ratio` and its report (`search`: the record of the search that chose it)."""
        config, clock = self.config, self.clock
        rank_plan, slower = self.planned(ratio)
        reallocation = None
        if self.reallocatable:
            # a speed search timed the first plan: the reallocated one may cost no more than it does (at the
            # search's ratio it could take the room the first plan left, and the time with it)
            at = ratio if config.plan.speedup is None else self.kept_share(rank_plan.choices, config.plan.budget)
            first = rank_plan, slower
            rank_plan, slower, reallocation = self.reallocated(at, rank_plan, slower)
            if config.plan.speedup is not None and search is not None and reallocation["moved"]:
                # the search timed the first plan; the same cost in parameters or MACs can take more time
                probe = self.speed_probe(rank_plan)
                if probe.ratio_high > 1 / config.plan.speedup:
                    logger.info("the reallocated plan runs at %.3f [%.3f, %.3f] of the original's time, not %.3gx "
                                "faster: the first plan kept", probe.ratio, probe.ratio_low, probe.ratio_high,
                                config.plan.speedup)  # fmt: skip
                    (rank_plan, slower), reallocation = first, reallocation | {"kept": "first", "too_slow": probe.ratio}
        reasons = self.reasons | slower
        clock.mark("ranks")
        propagation = None
        if config.fit.propagate:
            *propagated, waves = self.build_propagated(rank_plan)
            chosen, propagation = self.refitted(*propagated), {"waves": waves}
            if self.unseen is not None:  # propagation need not lower the model's error, refits included
                plain = self.refitted(*self.build(rank_plan))
                kept, whole = keep_better(chosen.model, plain.model, self.unseen)
                chosen, propagation = (chosen if kept else plain), propagation | whole
        else:
            chosen = self.refitted(*self.build(rank_plan))
        refined, fits = chosen.fitted, chosen.fits
        rectification, compensation = chosen.rectification, chosen.compensation
        new_model, folded, shrinking = streamlined(chosen.model)
        clock.mark("decompose")

        verification = self.check(new_model)
        refit = rectification is not None or compensation is not None
        if refit and config.plan.targeted and not meets(verification, config.plan):
            # the search's probes measured the model without these refits: where that one meets the target and
            # the refit one does not (its judge saw only part of the held-out data), it is kept
            refined = streamlined(refined)[0]
            plain = self.check(refined)
            if meets(plain, config.plan):
                logger.warning("the refit model misses the target on the held-out data: keeping it without refits")
                new_model, verification = refined, plain
                rectification, compensation = (
                    None if record is None else record | {"kept": False} for record in (rectification, compensation)
                )
        warn_if_lost(verification)
        latency, speedup = (), config.plan.speedup
        if config.verify.benchmark:  # is the result faster, end to end?
            sizes = sorted({1, config.verify.benchmark_batch} | ({config.plan.speedup_batch} if speedup else set()))
            latency = self.timed(new_model, sizes, self.progress, config.verify.benchmark_seconds)
            if speedup is not None and search is not None:
                search = closing_measurement(search, latency, speedup, config.plan.speedup_batch)
        clock.mark("verify")
        if self.store is not None:
            logger.info("cache %s: %s", config.runtime.cache_dir, self.store.summary() or "nothing to keep")

        row_costs = self.costs if self.costs.timing is not None else None
        if config.verify.layer_timings or speedup is not None:  # a time target's report shows the layers' times
            row_costs = row_costs or LayerCosts(self.layers, self.timing)
            row_costs.measure(self.scan.layers, {name: rank_plan.get(name) for name in fits}, self.progress)
            clock.mark("layer_timings")
        options = config.plan
        new_model = with_provenance(
            new_model, {"method": options.method, "budget": options.budget, "ratio": ratio, "norm": config.fit.norm}
        )
        rows = layer_rows(
            self.scan.layers, rank_plan, fits, reasons, method=config.plan.method, budget=config.plan.budget,
            ratio=ratio, sensitivity=self.weights_for(rank_plan.choices),
            timed=row_costs.timed_row if row_costs is not None else None, counted=self.counted,
            sampling=self.problems.sampling,
        )  # fmt: skip
        rows = sliced_rows(rows, self.layers, self.costs.coupled, rank_plan, shrinking)
        for record, note in (
            (rectification, "output refit through the activation"),
            (compensation, "refit (compensation)"),
        ):
            if record is not None and record.get("kept", True):
                refit = {name for wave in record["waves"] if wave["refit"] for name in wave["layers"]}
                rows = tuple(replace(row, reason=f"{row.reason}; {note}" if row.reason else note)
                             if row.name in refit else row for row in rows)  # fmt: skip
        predicted = None
        if self.sensitivity is not None:
            errors = {name: fit.rel_error for name, fit in fits.items()}
            predicted = predicted_output_error(errors, self.weights_for(rank_plan.choices))
        report = CompressionReport(
            layers=rows,
            model_totals=model_totals(self.model, new_model),
            error_norm="sigma" if self.statistics is not None else "frobenius",
            budget=config.plan.budget,
            target_ratio=ratio,
            verification=verification,
            search=search,
            reallocation=reallocation,
            propagation=propagation,
            output_refit=rectification,
            compensation=compensation,
            folded_pads=folded,
            shrunk_producers=shrinking.shrunk,
            latency=latency,
            calibration=self.statistics.source if self.statistics is not None else None,
            seconds=clock.seconds(),
            cpu_seconds=clock.cpu_seconds(),
            peak_rss_gib=clock.peak_rss(),
            settings=self._settings(ratio if search is None else config.plan.ratio),
            estimated_curve=self.estimated_curve,
            predicted_output_error=predicted,
        )
        logger.info("%s", report.table())
        return CompressionResult(new_model, report, self.tables, self.pruned_probes)
