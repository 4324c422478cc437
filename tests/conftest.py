"""Shared fixtures. Each fixture module is owned by one part of the suite."""

pytest_plugins = ["fixtures_server", "fixtures_images", "fixtures_metrics"]
