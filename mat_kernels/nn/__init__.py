"""Modules and functions for training: the sparse-update linear layers."""
