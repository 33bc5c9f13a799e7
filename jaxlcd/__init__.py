"""jaxlcd: reward-guided latent consistency distillation in JAX/Flax."""
__version__ = "0.1.0"
