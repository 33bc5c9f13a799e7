"""Data: a tfds array_record builder for captioned image folders and the grain training pipeline."""
from jaxlcd.data.folder import SKIP_REASONS, prepare_folder_dataset, read_prepare_stats, version_dir
from jaxlcd.data.pipeline import DataStats, TrainIterator, make_train_iterator

__all__ = ["SKIP_REASONS", "DataStats", "TrainIterator", "make_train_iterator", "prepare_folder_dataset",
           "read_prepare_stats", "version_dir"]
