"""`onnx-dacomp inspect`: table and JSON on real models, through the installed entry points."""

import json
import subprocess
import sys

import pytest
from builders import SHARED

from onnx_dacomp.cli import main

RESNET56 = SHARED / "models" / "cifar10_resnet56.onnx"
needs_shared = pytest.mark.skipif(not RESNET56.is_file(), reason="../shared/models is absent")


@needs_shared
def test_inspect_json(capsys):
    assert main(["inspect", str(RESNET56), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["layers"]) == 56  # 55 Conv and the classifier Gemm
    assert [layer["op_type"] for layer in report["layers"]].count("Conv") == 55
    assert report["layers"][-1] | {"name": None} == {
        "name": None, "op_type": "Gemm", "kernel": [], "in_channels": 64, "out_channels": 10, "stride": [],
        "dilation": [], "group": 1, "dtype": "float32", "params": 650, "macs": 640, "decomposable": True,
        "reason": None,
    }  # fmt: skip
    assert report["totals"]["all"] == {
        "layers": 56,
        "params": sum(layer["params"] for layer in report["layers"]),
        "macs": sum(layer["macs"] for layer in report["layers"]),
    }
    assert report["layers"][0] == {
        "name": "/conv1/Conv",
        "op_type": "Conv",
        "kernel": [3, 3],
        "in_channels": 3,
        "out_channels": 16,
        "stride": [1, 1],
        "dilation": [1, 1],
        "group": 1,
        "dtype": "float32",
        "params": 16 * 27 + 16,
        "macs": 16 * 27 * 32 * 32,
        "decomposable": True,
        "reason": None,
    }


@needs_shared
def test_inspect_table_via_python_m():
    result = subprocess.run(
        [sys.executable, "-m", "onnx_dacomp", "inspect", str(SHARED / "models" / "efficientnet_lite0_imagenet.onnx")],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["layer", "kernel", "in"]
    depthwise = [line for line in lines if "/_depthwise_conv/Conv" in line]
    assert len(depthwise) == 16 and all("no: depthwise convolution" in line for line in depthwise)
    assert any(line.strip().startswith("decomposable: 34 layers") for line in lines)  # 33 Conv and the classifier
    assert any(line.startswith("/_fc/Gemm") and line.rstrip().endswith("yes") for line in lines)
