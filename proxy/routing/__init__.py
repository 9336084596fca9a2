"""Routing: the immutable route table, building it from the config, picking a version."""
