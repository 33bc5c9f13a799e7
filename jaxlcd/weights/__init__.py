"""PyTorch <-> Flax weights: explicit name/layout tables and diffusers/transformers directory I/O."""
from jaxlcd.weights.components import ComponentSpec, load_component, save_component
from jaxlcd.weights.tables import WeightsError

__all__ = ["ComponentSpec", "WeightsError", "load_component", "save_component"]
