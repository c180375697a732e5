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
