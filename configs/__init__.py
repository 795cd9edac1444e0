"""Experiment configs: one `get_config()` per file, all built on `configs.base`."""
