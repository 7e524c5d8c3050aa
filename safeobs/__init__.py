"""safeobs: int8 quantization for x86 CPUs that never hits vpmaddubsw int16 saturation."""

__version__ = "0.1.0"
