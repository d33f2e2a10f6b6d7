"""Model export: builds every Triton model of a profile from its real architecture (see repository.py)."""
