"""Shared test helpers: tiny random PyTorch reference models and error measures."""
# 8 simulated CPU devices for the sharding tests; must be set before jax is first imported. The tests' programs are
# tiny, so compiling them (LLVM) costs far more than running them: backend optimisation level 0 made test_unet.py
# and test_reward_step.py ~40 % faster on a cold compile cache; it changes how XLA's CPU code is generated, not what
# it computes.
import os
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# Identical programs (e.g. the tiny train step in-process and in the resume subprocesses) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join("/tmp", f"jaxlcd_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
import numpy as np
import pytest
import torch


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(variant: str, file: str = "rglcd.py"):
    """``configs/<file>``'s get_config(variant) (the configs folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"config_{file[:-3]}", os.path.join(REPO, "configs", file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def rel_err(a, b) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter (norm scales and biases included) so a mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def nhwc_to_nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float32).transpose(0, 3, 1, 2).copy())


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
    torch.manual_seed(0)


# Files that take longest on a cold compile cache, longest first: pytest-xdist hands whole files to its two workers
# in collection order, so starting with these keeps one worker from getting a long file at the end.
SLOWEST_FILES = ("test_multiprocess.py", "test_train.py", "test_demo_run.py", "test_eval.py", "test_train_sharded.py",
                 "test_quality.py", "test_gcs.py", "test_workdir_errors.py",
                 "test_reward_step.py", "test_demo_models.py", "test_rewards.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept
