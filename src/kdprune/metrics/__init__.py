"""Accuracy, params/MACs/FLOPs, per-layer tables, latency (per backend)."""
from kdprune.metrics.accuracy import AccuracyMeter, topk_accuracy, topk_correct
from kdprune.metrics.complexity import (
    Complexity,
    complexity,
    count_params,
    format_markdown,
    format_table,
    layer_table,
    layer_widths,
)
from kdprune.metrics.backends import Backend, available_backends
from kdprune.metrics.latency import compare_backends, compare_latency, measure_latency

__all__ = [
    "AccuracyMeter",
    "Backend",
    "Complexity",
    "available_backends",
    "compare_backends",
    "compare_latency",
    "complexity",
    "count_params",
    "format_markdown",
    "format_table",
    "layer_table",
    "layer_widths",
    "measure_latency",
    "topk_accuracy",
    "topk_correct",
]
