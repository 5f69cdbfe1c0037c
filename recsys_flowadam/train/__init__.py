"""Training: the trainer loop, held-out metrics, checkpoints, recipes and artifacts."""

from recsys_flowadam.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from recsys_flowadam.train.config import TrainConfig
from recsys_flowadam.train.metrics import Predictor, evaluate_predictor, rmse_mae
from recsys_flowadam.train.trainer import NonFiniteLossError, TrainResult, resolve_device, train_model

__all__ = [
    "CheckpointError", "load_checkpoint", "save_checkpoint", "TrainConfig", "Predictor", "evaluate_predictor",
    "rmse_mae", "NonFiniteLossError", "TrainResult", "resolve_device", "train_model",
]
