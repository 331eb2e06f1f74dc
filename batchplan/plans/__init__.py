"""batchplan's plans: see the layer map in batchplan/__init__.py."""
