"""Database layer: SQLModel tables, engine setup, migrations and queries."""
