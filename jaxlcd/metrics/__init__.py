"""Evaluation for any model (not the demo world's): prompt sets (`prompts`), image generation for evaluation rows
(`generate`), FID (`fid`), image-text scores (`scores`), high-frequency energy (`spectral`), the whole evaluation
(`evaluate`) and its report (`report`). The CLI is `python -m jaxlcd.eval`."""
