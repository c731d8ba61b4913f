"""Real models and data used by the samples and benchmarks (all offline, cached under ``data/``)."""
