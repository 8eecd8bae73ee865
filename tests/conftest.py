import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ASYNCGEN_TIMEOUT", "60")
# tests/ is a package (tests/<area>/test_<module>.py, basenames repeat across areas); the shared
# helpers in fixtures/ are imported by module name (`import tiny_models`), here and in the worker
# processes of distributed tests, which inherit this sys.path.
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

import tiny_models  # noqa: E402
from asyncgen.cli import launcher  # noqa: E402

# Launches from this test process fork their workers from one server that imported torch and diffusers
# once; spawn would import them again in every worker of every launch (8-15 s each on two cores). The
# tests that run the `asyncgen` command in a subprocess keep its default, spawn, the users' path.
launcher.START_METHOD = "forkserver"


def pytest_configure(config):
    # Start the fork server now: its imports then overlap collection instead of counting against the
    # timeout of the first launch (tight under `pytest -n 2`, where two sessions import at once).
    import multiprocessing
    import multiprocessing.forkserver

    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # the pytest-xdist controller runs no test
    multiprocessing.get_context("forkserver").set_forkserver_preload(launcher.FORKSERVER_PRELOAD)
    multiprocessing.forkserver.ensure_running()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def family_path(model_dir):
    """``family_path(family)``: the tiny pipeline of ``family`` (one of ``tiny_models.FAMILIES``), built on first use."""
    built = {}

    def path(family: str) -> Path:
        if family not in built:
            built[family] = tiny_models.build(model_dir, family)
        return built[family]

    return path


@pytest.fixture(scope="session")
def sd_path(family_path) -> Path:
    return family_path("sd")


@pytest.fixture(scope="session")
def sdxl_path(family_path) -> Path:
    return family_path("sdxl")


@pytest.fixture(scope="session")
def controlnet_path(model_dir) -> Path:
    return tiny_models.build_controlnet(model_dir)


@pytest.fixture
def sd_pipe(sd_path):
    return tiny_models.load(sd_path)


@pytest.fixture
def sdxl_pipe(sdxl_path):
    return tiny_models.load(sdxl_path, "StableDiffusionXLPipeline")


@pytest.fixture(scope="session")
def dit_paths(family_path) -> dict:
    """The "dit" group's pipelines (SD3, PixArt, Flux), built together."""
    return {family: family_path(family) for family in tiny_models.names("dit")}


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.cuda`` tests where no CUDA GPU is visible (CI runs on CPUs)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Run a test's tiny models on one thread: faster, and much faster on a busy machine
    (no OpenMP barriers waiting for a descheduled second thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
