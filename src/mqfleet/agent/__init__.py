"""The mqfleet agent: status lifecycle, metric probes and the command executor.

It never imports the database layer (``mqfleet.store``), SQLAlchemy or SQLModel.
"""
