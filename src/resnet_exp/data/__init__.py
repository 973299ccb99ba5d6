from resnet_exp.data.interface import DataSource, TrainBatches, is_streamed, load_dataset
from resnet_exp.data.loader import Normalize, TrainLoader, crop_flip, eval_batches
from resnet_exp.data.sources import InMemorySource
from resnet_exp.data.splits import FileSplit, Placement, Split

__all__ = [
    "DataSource",
    "FileSplit",
    "InMemorySource",
    "Normalize",
    "Placement",
    "Split",
    "TrainBatches",
    "TrainLoader",
    "crop_flip",
    "eval_batches",
    "is_streamed",
    "load_dataset",
]
