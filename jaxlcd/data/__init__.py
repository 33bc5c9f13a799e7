"""Data: a tfds array_record builder for captioned image folders and the grain training pipeline."""
from jaxlcd.data.folder import SKIP_REASONS, prepare_folder_dataset, read_prepare_stats, version_dir
from jaxlcd.data.pipeline import DataStats, TrainIterator, make_train_iterator
from jaxlcd.data.shapes import Scene, eval_prompts, eval_scenes, parse_caption, prepare_shapes_dataset, sample_scene
from jaxlcd.data.tiny_folder import write_tiny_folder

__all__ = ["SKIP_REASONS", "DataStats", "TrainIterator", "make_train_iterator", "prepare_folder_dataset",
           "read_prepare_stats", "version_dir", "write_tiny_folder"]
__all__ += ["Scene", "eval_prompts", "eval_scenes", "parse_caption", "prepare_shapes_dataset", "sample_scene"]
