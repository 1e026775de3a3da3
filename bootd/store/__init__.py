"""The node registry behind a small repository interface (SQLite now, PostgreSQL later)."""
