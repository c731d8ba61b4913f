"""Post-training algorithms, one folder each."""
