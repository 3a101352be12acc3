"""Training sets as people bring them (image folders, saved ``datasets``, WebDataset shards, lab
datasets) read as checked rows with a report of the rows that cannot be used, and the preprocessing that
turns their images into training tensors."""

from diffmem.data.preprocess import preprocess
from diffmem.data.read import LAYOUTS, read_training_data
from diffmem.data.rows import Row, RowReport, TrainingData

__all__ = ["LAYOUTS", "Row", "RowReport", "TrainingData", "preprocess", "read_training_data"]
