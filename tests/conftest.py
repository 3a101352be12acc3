# Tests never reach a model hub: everything they load is built locally.
import json
import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# self-calibration profiles go to a cache of this test session, never the user's
os.environ["DIFFMEM_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffmem-test-cache-")

import numpy as np
import pytest
from PIL import Image

from diffmem.adapters import wrap_pipeline
from diffmem.models.tiny import tiny_stable_diffusion


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


@pytest.fixture
def accelerate_launch():
    """Runs ``python -m MODULE ARGS`` as two CPU processes of ``accelerate launch`` (gloo, one thread each:
    a CPU's results depend on its thread count) and returns their stdout; a failure shows their stderr."""
    import os
    import subprocess
    import sys

    def launch(*args: str) -> str:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    return launch


@pytest.fixture(scope="module")
def sd():
    """A tiny Stable Diffusion pipeline with random weights, wrapped as a denoiser (one per test module)."""
    return wrap_pipeline(tiny_stable_diffusion())


@pytest.fixture
def browser():
    """A headless Chromium driven by Debian's chromedriver, or a skip (a failure where
    DIFFMEM_REQUIRE_BROWSER is set, as in CI) when absent; closed after the test."""
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if webdriver is None or chromium is None or driver is None:
        message = "needs selenium and Debian's chromium + chromium-driver"
        if os.environ.get("DIFFMEM_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    opened = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield opened
    opened.quit()


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """An image folder of six random 20x24 images, each with its own caption ("a photo number i")."""
    folder = tmp_path_factory.mktemp("photos")
    rows = []
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"a photo number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder
