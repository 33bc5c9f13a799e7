"""Import open_clip (the PyTorch reference for CLIP/HPSv2/LRM parity) without torchvision.

open-clip-torch is installed with --no-deps: its torchvision requirement would pull a CUDA torch, and
the PyPI torchvision wheels do not load against the CPU torch build. open_clip uses torchvision only for
image transforms and FrozenBatchNorm2d, neither of which the model code under test touches, so those
names are stubbed with placeholders that raise if called, only while open_clip is imported: afterwards the stub
leaves sys.modules again, so other libraries (diffusers, transformers) still see that torchvision is absent.
"""
import importlib
import sys
import types


def _placeholder(name):
    def fail(*args, **kwargs):
        raise RuntimeError(f"torchvision stub: {name} is not available in the jaxlcd test environment")
    return type(name, (), {"__init__": fail})


def _stub_keys():
    return [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]


def _install_torchvision_stub() -> bool:
    """Put a torchvision stub in sys.modules unless a working torchvision exists; True if the stub went in."""
    # open_clip imports transformers, which asks importlib whether torchvision exists (find_spec fails on a stub):
    # let transformers and diffusers see the truth before the stub goes in.
    from transformers.utils import import_utils
    importlib.import_module("diffusers")

    import_utils.is_torchvision_available()
    try:
        importlib.import_module("torchvision")
        return False
    except Exception:
        for key in _stub_keys():
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
    return True


_stubbed = _install_torchvision_stub()
import open_clip  # noqa: E402
import open_clip.modified_resnet  # noqa: E402,F401
import open_clip.tokenizer  # noqa: E402,F401

if _stubbed:
    for _key in _stub_keys():
        del sys.modules[_key]

__all__ = ["open_clip"]
