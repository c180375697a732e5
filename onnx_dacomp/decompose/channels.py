"""Input-channel selection (docs/MATH.md, "Channel pruning"): keep R of a layer's S input channels and refit its
weight on them by least squares in the input covariance, `W' = W Sigma[:, K] Sigma[K, K]^-1`; the channels are
chosen greedily, each step taking the one whose columns remove the most output error given those already
kept (a block Schur complement of Sigma). Pure numpy: arrays in, arrays out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.linalg.blas import dgemm

from .covariance import output_energy, regularize, solve_psd


@dataclass(frozen=True)
class ChannelOrder:
    """Channels in the order the greedy selection takes them and the relative output error after each."""

    channels: np.ndarray  # (S,) every input channel, most useful first
    errors: np.ndarray  # (S,): errors[r - 1] is the error with the first r channels kept


def channel_order(weight: np.ndarray, sigma: np.ndarray) -> ChannelOrder:
    """The greedy order of the input channels of `weight` (T, S, *kernel) in `sigma`, the covariance of its input
    vectors (S * taps, channel-major as the weight's columns), and the error after each step (exact: each
    step's error is that of the least-squares refit on the channels kept so far)."""
    out_channels, channels = weight.shape[:2]
    taps = int(np.prod(weight.shape[2:], dtype=int))
    matrix = weight.reshape(out_channels, -1)
    # Fortran order, so that BLAS updates both in place each step (no n x n temporaries: 2.5-3x faster)
    residual = np.asfortranarray(regularize(sigma))  # the covariance of the input given the kept channels
    total = output_energy(matrix, residual)
    if total <= 0:
        return ChannelOrder(np.arange(channels), np.zeros(channels))
    projected = np.asfortranarray(matrix @ residual)  # W R: the output's covariance with each input, given the kept
    order, errors, remaining, kept = [], [], total, np.zeros(channels, bool)
    for _ in range(channels):
        candidates = np.flatnonzero(~kept)
        if taps == 1:  # a channel's block is its diagonal entry: no copies of the candidates' columns
            gains = np.einsum("ij,ij->j", projected, projected)[candidates] / residual.diagonal()[candidates]
        else:
            gains = _gains(projected, residual, candidates, taps)
        best, best_gain = int(candidates[np.argmax(gains)]), float(np.max(gains))
        columns = slice(best * taps, (best + 1) * taps)
        coupling = residual[:, columns].copy()
        scaled = coupling @ np.linalg.inv(coupling[columns])
        # P -= P_K B^-1 C^T and R -= C B^-1 C^T (C: the kept channel's columns of R, B: its block)
        kept_columns = projected[:, columns].copy(order="F")  # a copy: BLAS must not read what it writes
        projected = dgemm(-1.0, kept_columns, scaled, 1.0, projected, trans_b=True, overwrite_c=True)
        residual = dgemm(-1.0, scaled, coupling, 1.0, residual, trans_b=True, overwrite_c=True)
        kept[best] = True
        remaining = max(remaining - best_gain, 0.0)
        order.append(best)
        errors.append(remaining / total)
    errors[-1] = 0.0  # every channel kept: the layer itself
    return ChannelOrder(np.array(order), np.array(errors))


def _gains(projected: np.ndarray, residual: np.ndarray, candidates: np.ndarray, taps: int) -> np.ndarray:
    """The output error each candidate channel removes: `tr(P_c^T R_cc^-1 P_c)` with `P_c` its columns of W R."""
    columns = candidates[:, None] * taps + np.arange(taps)  # (m, taps)
    blocks = residual[columns[:, :, None], columns[:, None, :]]  # (m, taps, taps)
    parts = np.moveaxis(projected[:, columns], 0, -1)  # (m, taps, T)
    return np.einsum("mkt,mkt->m", parts, np.linalg.solve(blocks, parts))


def refit_on_channels(weight: np.ndarray, sigma: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """The least-squares weight (T, R, *kernel) on the input `channels` (sorted): `W Sigma[:, K] Sigma[K, K]^-1`."""
    out_channels, _ = weight.shape[:2]
    taps = int(np.prod(weight.shape[2:], dtype=int))
    columns = (channels[:, None] * taps + np.arange(taps)).ravel()
    sigma = regularize(sigma)
    refit = solve_psd(sigma[np.ix_(columns, columns)], sigma[columns] @ weight.reshape(out_channels, -1).T).T
    return refit.reshape(out_channels, len(channels), *weight.shape[2:])


def held_out_errors(
    weight: np.ndarray,
    sigma: np.ndarray,
    held_out: np.ndarray,
    counts: Sequence[int],
    order: ChannelOrder | None = None,
) -> list[float]:
    """Relative errors in the second moment `held_out` (of vectors the fit did not see) of the refits in `sigma`
    on the first R channels of the greedy `order` (computed where not given), for each R in `counts`: what a
    layer fitted from few vectors loses on others (its calibration estimates are optimistic).

    Every count at once: with the inputs in the greedy order and `Sigma = L L^T` (Cholesky), the refit on the
    first m inputs is `A[:, :m] B[:m]` with `A = W L`, `B = L^-1` (the lower triangular factors keep a prefix to
    itself), so `W` minus it is `A[:, m:] B[m:]`, and its error in `H` is the sum of `(A^T A) * (B H B^T)` over
    the trailing block `[m:, m:]`: one factorization instead of a refit per count (a 1280-input classifier's
    1280 counts: 188 s as refits)."""
    order = channel_order(weight, sigma) if order is None else order
    taps = int(np.prod(weight.shape[2:], dtype=int))
    inputs = (order.channels[:, None] * taps + np.arange(taps)).ravel()  # the input columns in the greedy order
    matrix = np.asarray(weight, np.float64).reshape(len(weight), -1)
    total = output_energy(matrix, held_out)
    if total <= 0:
        return [0.0] * len(counts)
    lower = scipy.linalg.cholesky(regularize(sigma)[np.ix_(inputs, inputs)], lower=True)
    mapped = matrix[:, inputs] @ lower
    inverse = scipy.linalg.solve_triangular(lower, np.eye(len(lower)), lower=True)
    terms = (mapped.T @ mapped) * (inverse @ np.asarray(held_out, np.float64)[np.ix_(inputs, inputs)] @ inverse.T)
    trailing = terms[::-1, ::-1].cumsum(axis=0).cumsum(axis=1)[::-1, ::-1]  # [m, m]: the sum over [m:, m:]
    return [float(max(trailing[count * taps, count * taps], 0.0)) / total if count * taps < len(inputs) else 0.0
            for count in counts]  # fmt: skip
