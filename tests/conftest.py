# Tests never reach a model hub: everything they load is built locally.
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest


@pytest.fixture(scope="session")
def micro_lab_data(tmp_path_factory):
    """A micro-lab dataset (built from Debian's Fashion-MNIST; tests needing it skip without it)."""
    from diffmem.errors import DiffmemError
    from diffmem.lab.dataset import LabConfig, build_lab_dataset
    from diffmem.lab.fashion_mnist import fashion_mnist_root

    try:
        fashion_mnist_root()
    except DiffmemError as error:
        pytest.skip(str(error))
    return build_lab_dataset(tmp_path_factory.mktemp("lab") / "data", LabConfig.micro(), progress=False)
