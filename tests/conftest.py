import tarfile

import pytest
from builders import SHARED


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """The shared CIFAR-10 JPEG archive, extracted once per test session (shared/ is read-only)."""
    archive = SHARED / "data" / "cifar10_jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip("../shared/data is absent")
    target = tmp_path_factory.mktemp("cifar")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target / "cifar10"


@pytest.fixture(scope="session")
def cifar_train(cifar_root):
    return cifar_root / "train"


@pytest.fixture(autouse=True)
def quick_latency(request, monkeypatch):
    """Every compress ends with an end-to-end latency measurement (rounds until the ratio's interval is
    within +-3 %, up to --benchmark-seconds per batch size). Tests whose subject is not timing measure three
    rounds; test_latency.py keeps the real settings."""
    if request.module.__name__ == "test_latency":
        return
    from onnx_dacomp import latency

    monkeypatch.setattr(latency, "MIN_ROUNDS", 3)
    monkeypatch.setattr(latency, "MAX_ROUNDS", 3)
    monkeypatch.setattr(latency, "BLOCK_SECONDS", 0.001)
