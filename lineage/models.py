"""Datasets and lineage edges (built out by the lineage work)."""
