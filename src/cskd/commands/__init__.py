"""One file per command beside train: eval, cache, diagnose, demo."""
