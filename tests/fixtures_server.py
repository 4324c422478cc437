"""Fixtures that start diskwatch servers (see fixtures_images for disk images)."""
