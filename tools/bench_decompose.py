"""Benchmark of the decomposition solvers on a 512x512x3x3 weight with a realistic patch covariance.

    python3 tools/bench_decompose.py [--channels 512] [--cp-rank 512] [--skip-cp]

The covariance is the patch second moment of smooth random fields (spatially correlated by a Gaussian
blur, channel-correlated by a mixing matrix with a decaying spectrum), as late conv layers see; the
rank-deficient variant uses fewer patches than the patch dimension. The weight has a decaying spectrum
like a trained one. Prints DA and Frobenius Sigma-errors side by side, sweeps, time per sweep, the time to
come within 1e-4 of the converged error, and peak memory (numpy allocations, via tracemalloc).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import tracemalloc

import numpy as np
import scipy.ndimage

from onnx_dacomp.decompose.covariance import sigma_error
from onnx_dacomp.decompose.cp import cp_als, da_cp
from onnx_dacomp.decompose.factors import reconstruct
from onnx_dacomp.decompose.tucker2 import da_tucker2, tucker2_hooi


def smooth_field_covariance(channels: int, patches: int, rng: np.random.Generator, kernel: int = 3) -> np.ndarray:
    """Second moment of kxk patches of channel-mixed, blurred white noise (`patches` samples)."""
    side = 24
    per_image = (side - kernel + 1) ** 2
    images = -(-patches // per_image)
    spectrum = 1.0 / np.arange(1, channels + 1) ** 0.75
    q, _ = np.linalg.qr(rng.standard_normal((channels, channels)))
    mixing = (q * spectrum).astype(np.float32)
    total = np.zeros((channels * kernel * kernel,) * 2)
    taken = 0
    for _ in range(images):
        noise = rng.standard_normal((channels, side, side)).astype(np.float32)
        field = scipy.ndimage.gaussian_filter(noise, sigma=(0, 1.5, 1.5))
        field = np.tensordot(mixing, field, axes=(1, 0)) + 0.3 * mixing.sum(1)[:, None, None]  # nonzero mean
        windows = np.lib.stride_tricks.sliding_window_view(field, (kernel, kernel), axis=(1, 2))
        rows = windows.transpose(1, 2, 0, 3, 4).reshape(per_image, -1)[: patches - taken]
        total += (rows.T @ rows).astype(np.float64)
        taken += len(rows)
    return total / taken


def trained_like_weight(channels: int, rng: np.random.Generator, kernel: int = 3) -> np.ndarray:
    n = channels * kernel * kernel
    left, _ = np.linalg.qr(rng.standard_normal((channels, channels)))
    right, _ = np.linalg.qr(rng.standard_normal((n, channels)))
    singular = 1.0 / np.arange(1, channels + 1) ** 0.5
    return ((left * singular) @ right.T).reshape(channels, channels, kernel, kernel)


def timed(function, *args, **kwargs):
    tracemalloc.start()
    stamps = []
    start = time.perf_counter()
    kwargs_cb = dict(kwargs)
    if "callback" in kwargs_cb:
        kwargs_cb["callback"] = lambda sweep, error: stamps.append((time.perf_counter() - start, error))
    result = function(*args, **kwargs_cb)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, elapsed, peak, stamps


def time_to_within(stamps, target: float) -> float | None:
    for seconds, error in stamps:
        if error <= target:
            return seconds
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--tucker-rank", type=int, default=256)
    parser.add_argument("--cp-rank", type=int, default=512)
    parser.add_argument("--tucker-sweeps", type=int, default=60, help="sweeps of the long reference run")
    parser.add_argument("--cp-sweeps", type=int, default=80)
    parser.add_argument("--skip-cp", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    channels, n = args.channels, args.channels * 9
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores; numpy {np.__version__}")
    weight = trained_like_weight(channels, rng)
    variants = {
        "full-rank": (4 * n, smooth_field_covariance(channels, 4 * n, rng)),
        "rank-deficient": (n // 2, smooth_field_covariance(channels, n // 2, rng)),
    }
    for label, (patches, sigma) in variants.items():
        print(f"\n== {label} Sigma from {patches} patches: W {weight.shape}, Sigma {sigma.shape}")
        ranks = (args.tucker_rank, args.tucker_rank)
        hooi, hooi_time, _, _ = timed(tucker2_hooi, weight, ranks)
        hooi_sigma = sigma_error(weight, reconstruct(hooi.factors), sigma)
        # run well past the default tolerance to know the converged error, timing every sweep
        da, da_time, da_peak, stamps = timed(
            da_tucker2, weight, sigma, ranks, tol=1e-9, max_iter=args.tucker_sweeps, callback=True
        )
        da_sigma = sigma_error(weight, reconstruct(da.factors), sigma)
        within = time_to_within(stamps, da.rel_error + 1e-4)
        default, default_time, _, _ = timed(da_tucker2, weight, sigma, ranks)
        per_sweep = np.diff([t for t, _ in stamps]).mean()
        print(f"Tucker-2 ranks {ranks}:           Sigma-error   Frobenius error")
        print(f"  Frobenius HOOI               {hooi_sigma:10.6f}   {hooi.rel_error:10.6f}   ({hooi_time:.1f} s)")
        print(
            f"  DA-Tucker-2 ({da.iterations} sweeps)      {da_sigma:10.6f}   "
            f"{sigma_error(weight, reconstruct(da.factors), None):10.6f}   "
            f"({da_time:.1f} s, {per_sweep:.2f} s/sweep)"
        )
        print(
            f"  DA-Tucker-2 default tol      {default.rel_error:10.6f}                "
            f"({default_time:.1f} s, {default.iterations} sweeps)"
        )
        print(
            f"  within 1e-4 of the {da.iterations}-sweep error after {within:.1f} s (goal < 60 s); "
            f"peak numpy memory {da_peak / 2**30:.2f} GiB (goal < 4)"
        )
        if args.skip_cp:
            continue
        cp_frob, cp_frob_time, _, _ = timed(cp_als, weight, args.cp_rank)
        cp_frob_sigma = sigma_error(weight, reconstruct(cp_frob.factors), sigma)
        cp, cp_time, cp_peak, cp_stamps = timed(
            da_cp, weight, sigma, args.cp_rank, max_iter=args.cp_sweeps, tol=1e-6, callback=True
        )
        cp_sigma = sigma_error(weight, reconstruct(cp.factors), sigma)
        per_sweep = np.diff([t for t, _ in cp_stamps]).mean()
        print(f"CP rank {args.cp_rank}:")
        print(
            f"  Frobenius CP-ALS ({cp_frob.iterations} sweeps)  {cp_frob_sigma:10.6f}   "
            f"{cp_frob.rel_error:10.6f}   ({cp_frob_time:.1f} s)"
        )
        print(
            f"  DA-CPD ({cp.iterations} sweeps)           {cp_sigma:10.6f}   "
            f"{sigma_error(weight, reconstruct(cp.factors), None):10.6f}   "
            f"({cp_time:.1f} s incl. init, {per_sweep:.2f} s/sweep)"
        )
        print(
            f"  error after 0/10/20/40 sweeps: "
            f"{[round(cp.history[i], 6) for i in (0, 10, 20, 40) if i < len(cp.history)]}; "
            f"peak numpy memory {cp_peak / 2**30:.2f} GiB"
        )


if __name__ == "__main__":
    main()
