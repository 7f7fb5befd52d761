"""Infrastructure with no method code: checkpoint files, weights adaptation, processes and ranks, the run log."""
