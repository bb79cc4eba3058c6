"""dtrain: a distributed trainer for BERT models."""

__version__ = "0.1.0"
