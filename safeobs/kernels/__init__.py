"""Layer 0: what the x86 int8 kernels do (dispatch, pair layouts, emulator, real-kernel runs).

Imports nothing of safeobs above it.
"""
