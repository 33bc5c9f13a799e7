"""Model folders -> (Flax module, params): the component registry above `jaxlcd.models` and `jaxlcd.weights`."""
from jaxlcd.loaders.components import SPECS, load_component, save_component, spec_for_config

__all__ = ["SPECS", "load_component", "save_component", "spec_for_config"]
