"""Thin command-line entries: `python -m launcher.train` (Hydra) and `launcher.bootstrap` (rank discovery)."""
