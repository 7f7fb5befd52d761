"""A training run: its assembly and epoch loop (run), the factories (build), the saved state and resume (state), the step (engine), evaluation, the pre-flight and the diagnostics."""
