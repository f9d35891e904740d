"""Pretraining, caching and benchmarks of the domain methods (issue #34), one family per file.
Import from the module files.
"""
