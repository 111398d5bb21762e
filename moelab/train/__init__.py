"""Training: the loop (`train`), optimizer groups and LR schedule, routing schedules, checkpoints of the
full training state, and telemetry. See docs/training.md."""

from moelab.train.loop import Trainer, TrainingDiverged, TrainResult, train

__all__ = ["TrainResult", "Trainer", "TrainingDiverged", "train"]
