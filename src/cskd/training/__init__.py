"""A training run: its assembly and epoch loop (run), the models (models), the other factories
(build), the saved state and resume (state), the step (engine), evaluation, the final outputs
(outputs), the pre-flight and the diagnostics."""
