"""Layer 4: model-level tools (verify, audit, repair, demo, model files), dispatching through :mod:`.runtimes`."""
