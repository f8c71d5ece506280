"""stablemlp model: the stabilized MLP, its data, training and checkpoints."""

from .categories import MISSING_MARKERS, CategoricalColumn, learn_column
from .checkpoint import Checkpoint, FeatureSchema, load_checkpoint, save_checkpoint
from .csvdata import load_csv, load_dataset
from .data import DataError, Dataset, Splits, split_dataset
from .encoding import CategoryEncoder, EncoderConfig, TabularNet
from .estimator import StableMLPClassifier
from .gradients import GradientMonitor, NonFiniteGradientError
from .lookup import TextClassifier, TextLookup, TextOnlyClassifier, with_lookup
from .network import MLPConfig, StabilizedMLP
from .preprocess import Classifier, NumericEncoder, NumericEncoding, Standardize, build_classifier
from .train import NonFiniteLossError, TrainConfig, evaluate, fit

__all__ = [
    "MISSING_MARKERS",
    "CategoricalColumn",
    "CategoryEncoder",
    "Checkpoint",
    "Classifier",
    "DataError",
    "Dataset",
    "EncoderConfig",
    "FeatureSchema",
    "GradientMonitor",
    "MLPConfig",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "NumericEncoder",
    "NumericEncoding",
    "Splits",
    "StabilizedMLP",
    "StableMLPClassifier",
    "Standardize",
    "TabularNet",
    "TextClassifier",
    "TextLookup",
    "TextOnlyClassifier",
    "TrainConfig",
    "build_classifier",
    "evaluate",
    "fit",
    "learn_column",
    "load_checkpoint",
    "load_csv",
    "load_dataset",
    "save_checkpoint",
    "split_dataset",
    "with_lookup",
]
