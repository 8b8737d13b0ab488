"""Versioned schemas and mappings (built out by the transforms issue)."""
