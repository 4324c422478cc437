"""Session-scoped fixtures that build real disk images."""
