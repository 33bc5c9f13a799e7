"""torch-fidelity's FID Inception and FID formula (the PyTorch reference for jaxlcd.metrics.fid) without torchvision.

torch-fidelity is installed with --no-deps (its torchvision requirement would pull a CUDA torch, as open_clip's
does, see open_clip_ref.py). Its package ``__init__`` imports every feature extractor, some of which need
torchvision; the modules under test (``feature_extractor_inceptionv3``, ``interpolate_compat_tensorflow`` and the
formula in ``metric_fid``) do not. So the package is entered without running its ``__init__``, and
``torch_fidelity.utils`` (torchvision-based dataset helpers that ``metric_fid`` imports by name but the formula does
not call) is a placeholder module.
"""
import importlib
import importlib.util
import os
import sys
import types


def install():
    """Enter the torch_fidelity package without its __init__ (idempotent); call before importing torchmetrics."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = [os.path.dirname(spec.origin)]
        sys.modules["torch_fidelity"] = pkg
        utils = types.ModuleType("torch_fidelity.utils")
        utils.__getattr__ = lambda name: (lambda *a, **k: (_ for _ in ()).throw(RuntimeError(f"stub: {name}")))
        sys.modules["torch_fidelity.utils"] = utils


def inception_class():
    """torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3."""
    install()
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def resize_tf1():
    install()
    return importlib.import_module("torch_fidelity.interpolate_compat_tensorflow").interpolate_bilinear_2d_like_tensorflow1x


def fid_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """torch-fidelity's fid_statistics_to_metric."""
    install()
    metric = importlib.import_module("torch_fidelity.metric_fid")
    out = metric.fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)
    return out[metric.KEY_METRIC_FID]
