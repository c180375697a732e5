"""The chains of DESIGN.md 2.1-2.3 reproduce the original Conv exactly when the weight is representable."""

import numpy as np
import onnx
import pytest
from builders import conv_model, conv_reference, relative_error, run, same_pads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_dacomp.decompose.factors import CPFactors, FusedCPFactors, SVDFactors, Tucker2Factors, reconstruct
from onnx_dacomp.rewrite import replace_layers
from onnx_dacomp.targets import find_targets


def random_factors(method, rng, out_channels, in_channels, kernel):
    """Factors of one group with small random ranks; the weight they represent is exactly low-rank."""
    if method == "svd":
        rank = int(rng.integers(1, 5))
        return SVDFactors(rng.standard_normal((rank, in_channels, *kernel)), rng.standard_normal((out_channels, rank)))
    if method == "tucker2":
        r_t, r_s = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        return Tucker2Factors(
            rng.standard_normal((in_channels, r_s)),
            rng.standard_normal((r_t, r_s, *kernel)),
            rng.standard_normal((out_channels, r_t)),
        )
    rank = int(rng.integers(1, 6))
    return (FusedCPFactors if method == "cp-fused" else CPFactors)(
        rng.standard_normal((in_channels, rank)),
        tuple(rng.standard_normal((k, rank)) for k in kernel),
        rng.standard_normal((out_channels, rank)),
    )


def same_ranks(factors_list, method, rng, out_channels, in_channels, kernel):
    """Groups must share ranks: draw the first group's factors, then the others with the same shapes."""
    first = factors_list[0]
    out = [first]
    for _ in factors_list[1:]:
        if method == "svd":
            out.append(SVDFactors(rng.standard_normal(first.first.shape), rng.standard_normal(first.last.shape)))
        elif method == "tucker2":
            out.append(
                Tucker2Factors(
                    *(rng.standard_normal(a.shape) for a in (first.input_factor, first.core, first.output_factor))
                )
            )
        else:
            out.append(
                type(first)(
                    rng.standard_normal(first.input_factor.shape),
                    tuple(rng.standard_normal(f.shape) for f in first.spatial_factors),
                    rng.standard_normal(first.output_factor.shape),
                )
            )
    return out


conv_configs = st.fixed_dictionaries(
    {
        "spatial": st.sampled_from([2, 2, 2, 1]),
        "kernel": st.tuples(st.integers(1, 7), st.integers(1, 7)),
        "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "padding": st.sampled_from(["none", "symmetric", "asymmetric", "SAME_UPPER", "SAME_LOWER", "VALID"]),
        "pads": st.tuples(*[st.integers(0, 3)] * 4),
        "bias": st.booleans(),
        "batch": st.integers(1, 3),
        "group": st.sampled_from([1, 1, 2]),
        "dtype": st.sampled_from([np.float32, np.float32, np.float16]),
        "extra": st.tuples(st.integers(0, 5), st.integers(0, 5)),
        "seed": st.integers(0, 2**31 - 1),
    }
)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "cp-fused"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=conv_configs)
def test_chain_reproduces_conv(method, config):
    rng = np.random.default_rng(config["seed"])
    spatial, group = config["spatial"], config["group"]
    kernel = config["kernel"][:spatial]
    strides, dilations = config["stride"][:spatial], config["dilation"][:spatial]
    if config["padding"].startswith("SAME"):
        dilations = (1,) * spatial  # onnxruntime rejects dilation with SAME_* auto_pad
    in_channels, out_channels = 3 * group, 4 * group
    size = tuple((k - 1) * d + 1 + e for k, d, e in zip(kernel, dilations, config["extra"]))
    input_shape = (config["batch"], in_channels, *size)

    factors = [random_factors(method, rng, out_channels // group, in_channels // group, kernel)]
    factors = same_ranks(factors * group, method, rng, out_channels // group, in_channels // group, kernel)
    weight = np.concatenate([reconstruct(f) for f in factors])
    dtype = config["dtype"]
    if dtype == np.float16:
        # keep fp16 values representable: the point is the chain's structure, not fp16 range
        scale = np.abs(weight).max()
        factors = [_scaled(f, 1 / scale) for f in factors]
        weight = np.concatenate([reconstruct(f) for f in factors])
    bias = rng.standard_normal(out_channels) if config["bias"] else None

    attrs = dict(strides=list(strides), dilations=list(dilations), group=group, kernel_shape=list(kernel))
    padding = config["padding"]
    if padding in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        attrs["auto_pad"] = padding
        axis_pads = [same_pads(n, k, s, d, padding) for n, k, s, d in zip(size, kernel, strides, dilations)]
        pads = [p[0] for p in axis_pads] + [p[1] for p in axis_pads]
    else:
        raw = list(config["pads"])
        pads = (
            [0] * 2 * spatial
            if padding == "none"
            else raw[:spatial] * 2
            if padding == "symmetric"
            else raw[:spatial] + raw[2 : 2 + spatial]
        )
        attrs["pads"] = pads

    model = conv_model(weight, bias, input_shape=input_shape, dtype=dtype, **attrs)
    layer = find_targets(model).targets[0]
    chain = replace_layers(model, {layer.output: (layer, factors)})
    onnx.checker.check_model(chain)

    x = rng.standard_normal(input_shape).astype(dtype)
    (original,) = run(model, {"x": x})
    (rewritten,) = run(chain, {"x": x})
    reference = conv_reference(
        x,
        weight.astype(dtype),
        None if bias is None else bias.astype(dtype),
        strides=strides,
        pads=pads,
        dilations=dilations,
        group=group,
    )
    tolerance = 1e-5 if dtype == np.float32 else 1e-2
    assert rewritten.shape == original.shape == reference.shape
    assert relative_error(original, reference) < tolerance  # the harness itself computes the right thing
    assert relative_error(rewritten, original) < tolerance
    chain_ops = [node.op_type for node in chain.graph.node]
    convs = {"svd": 2, "cp": 2 + spatial, "cp-fused": 3}
    if method == "tucker2":  # a square (full-rank) factor is folded into the core
        square = [f.shape[0] == f.shape[1] for f in (factors[0].input_factor, factors[0].output_factor)]
        convs["tucker2"] = 3 - sum(square)
    assert chain_ops == ["Conv"] * convs[method]


def _scaled(factors, scale):
    if isinstance(factors, SVDFactors):
        return SVDFactors(factors.first * scale, factors.last)
    if isinstance(factors, Tucker2Factors):
        return Tucker2Factors(factors.input_factor, factors.core * scale, factors.output_factor)
    return type(factors)(factors.input_factor * scale, factors.spatial_factors, factors.output_factor)
