"""Analysis and reporting of a model: the per-layer summary table (``lowbit summary``), sensitivity, histograms."""

from lowbit.analysis.summary import format_bytes, format_count, print_summary, summary_json, summary_table

__all__ = ["format_bytes", "format_count", "print_summary", "summary_json", "summary_table"]
