"""Accuracy, params/MACs/FLOPs, per-layer tables, latency (per backend, per-layer latency table)."""
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
from kdprune.metrics.latency_table import LatencyModel, LatencyTable, layer_calls, shared_table

__all__ = [
    "AccuracyMeter",
    "Backend",
    "Complexity",
    "LatencyModel",
    "LatencyTable",
    "available_backends",
    "compare_backends",
    "compare_latency",
    "complexity",
    "count_params",
    "format_markdown",
    "format_table",
    "layer_calls",
    "layer_table",
    "layer_widths",
    "measure_latency",
    "shared_table",
    "topk_accuracy",
    "topk_correct",
]
