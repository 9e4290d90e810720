"""Private machinery of the engine: worker processes, their pipes and shared memory."""
