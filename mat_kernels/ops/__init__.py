"""``torch.library`` operators of mat_kernels (``mat_kernels::*``)."""
from .gram import segment_grams

__all__ = ["segment_grams"]
