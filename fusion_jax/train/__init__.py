"""Training: optimiser, pure jit/pmap steps, the chunked loop and Orbax checkpoints."""
