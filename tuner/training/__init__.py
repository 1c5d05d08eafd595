"""Training plan tuner (Mist design): layouts x per-stage Pareto frontiers x inter-stage MILP."""

from tuner.training.search import SearchStats, Tuned, TuneResult, tune_training

__all__ = ["SearchStats", "TuneResult", "Tuned", "tune_training"]
