"""Evaluation metrics for any model (not the demo world's): FID (`jaxlcd.metrics.fid`)."""
