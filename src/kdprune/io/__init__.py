"""Pickle-free save/load of pruned models (structure.json + model.safetensors), BN folding, and
export (ONNX, TorchScript, ExportedProgram) with a built-in parity check."""
from kdprune.io.artefacts import ExportFormat
from kdprune.io.exporter import ExportError, ExportResult, Normalization, export, sidecar_path, verify_export
from kdprune.io.fold import find_conv_bn_pairs, fold_bn
from kdprune.io.parity import Divergence, ParityError, ParityReport
from kdprune.io.save import (STRUCTURE_FILE, WEIGHTS_FILE, check_savable, factory_name, load_pruned, save_pruned,
                             state_sha256)

__all__ = [
    "save_pruned", "check_savable", "load_pruned", "factory_name", "state_sha256", "STRUCTURE_FILE", "WEIGHTS_FILE",
    "fold_bn", "find_conv_bn_pairs", "export", "ExportFormat", "ExportResult", "ExportError", "Normalization",
    "ParityError", "ParityReport", "Divergence", "sidecar_path", "verify_export",
]
