"""Layer 1: runtime-independent math on plain codes and arrays: safe scales, safe rounding, verification."""
