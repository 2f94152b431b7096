"""Torch building blocks of the MoLE-Flow model. They know nothing about files, CLI or metrics."""
