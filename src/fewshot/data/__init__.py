"""Datasets, episode sampling and the Lightning data module."""
