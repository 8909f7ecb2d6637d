"""Reports a person reads: Markdown tables, JSON, and PNG plots."""
