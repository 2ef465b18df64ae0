"""``python -m mat_kernels``: what is usable on this machine."""
from mat_kernels.info import main

main()
