"""An embedding extractor from EfficientNet-Lite0: the network up to its pooled feature vector.

    python3 tools/make_embedding_model.py [-o efficientnet_lite0_embedding.onnx]

Cuts `../shared/models/efficientnet_lite0_imagenet.onnx` at the flattened global average pool (`embedding`
[N, 1280]) with `onnx.utils.extract_model`, dropping the classifier: a non-classifier model (the kind image
retrieval and re-identification pipelines deploy) for tests and benchmarks of the output-aware verification
and of `--max-error`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx
import onnx.utils

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "models" / "efficientnet_lite0_imagenet.onnx"
FEATURES = "/Flatten_output_0"  # GlobalAveragePool -> Flatten: [N, 1280], the input of the classifier Gemm


def build(source: Path = SOURCE) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "embedding.onnx"
        onnx.utils.extract_model(str(source), str(path), ["input"], [FEATURES])
        model = onnx.load(str(path))
    model.graph.output[0].name = "embedding"
    for node in model.graph.node:
        node.output[:] = ["embedding" if name == FEATURES else name for name in node.output]
    model.doc_string = "EfficientNet-Lite0 up to its pooled features (tools/make_embedding_model.py)"
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("efficientnet_lite0_embedding.onnx"))
    args = parser.parse_args()
    onnx.save(build(), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
