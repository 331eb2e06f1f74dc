"""batchplan's application: see the layer map in batchplan/__init__.py."""
