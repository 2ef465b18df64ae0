"""``python -m mat_kernels``: what is usable on this machine."""
from mat_kernels._info import main

main()
