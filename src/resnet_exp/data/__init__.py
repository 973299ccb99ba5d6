from resnet_exp.data.loader import Normalize, TrainLoader, crop_flip, eval_batches
from resnet_exp.data.sources import Dataset, Split, load_dataset

__all__ = [
    "Dataset",
    "Normalize",
    "Split",
    "TrainLoader",
    "crop_flip",
    "eval_batches",
    "load_dataset",
]
