"""PyTorch <-> Flax weights: explicit name/layout tables and safetensors directory I/O; knows no model family.

``load_component`` / ``save_component`` live in `jaxlcd.loaders` (the registry of model families, above
`jaxlcd.models`); they are reachable here too, imported on first use, because users call
``jaxlcd.weights.load_component``.
"""
from jaxlcd.weights.spec import ComponentSpec
from jaxlcd.weights.tables import WeightsError

__all__ = ["ComponentSpec", "WeightsError", "load_component", "save_component"]


def __getattr__(name: str):
    if name in ("load_component", "save_component"):
        from jaxlcd import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'jaxlcd.weights' has no attribute {name!r}")
