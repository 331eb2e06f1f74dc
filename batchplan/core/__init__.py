"""batchplan's ground floor: see the layer map in batchplan/__init__.py."""
