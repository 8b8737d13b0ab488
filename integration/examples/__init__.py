"""Example pipelines on real data."""
