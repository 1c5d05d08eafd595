"""Training simulation: one iteration of a plan -> TrainingReport."""

from simulator.training.report import TrainingReport
from simulator.training.simulate import simulate_training, training_timeline

__all__ = ["TrainingReport", "simulate_training", "training_timeline"]
