"""stablemlp model: the stabilized MLP, its data, training and checkpoints."""

from .checkpoint import Checkpoint, FeatureSchema, load_checkpoint, save_checkpoint
from .data import DataError, Dataset, Splits, load_dataset, split_dataset
from .gradients import GradientMonitor, NonFiniteGradientError
from .network import MLPConfig, StabilizedMLP
from .preprocess import Classifier, Standardize, build_classifier
from .train import NonFiniteLossError, TrainConfig, evaluate, fit

__all__ = [
    "Checkpoint",
    "Classifier",
    "DataError",
    "Dataset",
    "FeatureSchema",
    "GradientMonitor",
    "MLPConfig",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "Splits",
    "StabilizedMLP",
    "Standardize",
    "TrainConfig",
    "build_classifier",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_dataset",
    "save_checkpoint",
    "split_dataset",
]
