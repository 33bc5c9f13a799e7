"""Flax linen ports of the Stable Diffusion components (NHWC inside)."""
