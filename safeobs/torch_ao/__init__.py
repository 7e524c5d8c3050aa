"""Runtime adapter: torch.ao (eager / FX) quantization: observers, qconfigs, quantized-layer access, rounding glue."""
