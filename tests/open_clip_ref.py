"""Import open_clip (the PyTorch reference for CLIP/HPSv2/LRM parity) without torchvision.

open-clip-torch is installed with --no-deps: its torchvision requirement would pull a CUDA torch, and
the PyPI torchvision wheels do not load against the CPU torch build. open_clip uses torchvision only for
image transforms and FrozenBatchNorm2d, neither of which the model code under test touches, so those
names are stubbed with placeholders that raise if called.
"""
import importlib
import sys
import types


def _placeholder(name):
    def fail(*args, **kwargs):
        raise RuntimeError(f"torchvision stub: {name} is not available in the jaxlcd test environment")
    return type(name, (), {"__init__": fail})


def _install_torchvision_stub():
    # transformers asks importlib whether torchvision exists; let it see the truth before the stub goes in.
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()
    try:
        importlib.import_module("torchvision")
        return
    except Exception:
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
    names = {
        "torchvision": [], "torchvision.transforms": [
            "Normalize", "Compose", "RandomResizedCrop", "InterpolationMode", "ToTensor", "Resize",
            "CenterCrop", "ColorJitter", "Grayscale", "RandomHorizontalFlip", "RandomGrayscale"],
        "torchvision.transforms.functional": [], "torchvision.ops": [], "torchvision.ops.misc": ["FrozenBatchNorm2d"],
    }
    for mod_name, attrs in names.items():
        mod = types.ModuleType(mod_name)
        for attr in attrs:
            setattr(mod, attr, _placeholder(attr))
        sys.modules[mod_name] = mod
    import enum
    sys.modules["torchvision.transforms"].InterpolationMode = enum.Enum(
        "InterpolationMode", "NEAREST BILINEAR BICUBIC BOX HAMMING LANCZOS NEAREST_EXACT")
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    sys.modules["torchvision"].ops = sys.modules["torchvision.ops"]
    sys.modules["torchvision.ops"].misc = sys.modules["torchvision.ops.misc"]


_install_torchvision_stub()
import open_clip  # noqa: E402

__all__ = ["open_clip"]
