"""Native CPU kernels kiln compiles on first use (see :mod:`kiln.kernels.native`)."""
