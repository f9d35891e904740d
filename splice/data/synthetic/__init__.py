"""Synthetic data built from the packaged tasks for the domain methods (issue #34), one kind
per file (seeded; generation documented in each module). Import from the module files.
"""
