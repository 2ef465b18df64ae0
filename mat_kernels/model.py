"""Deprecated path: moved to :mod:`mat_kernels.measure.model` (works until 0.3, with a warning)."""
from mat_kernels._compat import moved

moved(__name__, "mat_kernels.measure.model")
