"""``python -m mat_kernels``: what is usable on this machine."""
from ._info import main

main()
