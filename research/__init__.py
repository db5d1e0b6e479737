"""Flax NNX BERT-family encoders: models, data, training, evaluation, parallelism."""

__version__ = "0.1.0"
