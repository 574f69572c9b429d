"""Pickle-free save/load of pruned models (structure.json + model.safetensors)."""
from kdprune.io.save import STRUCTURE_FILE, WEIGHTS_FILE, factory_name, load_pruned, save_pruned

__all__ = ["save_pruned", "load_pruned", "factory_name", "STRUCTURE_FILE", "WEIGHTS_FILE"]
