"""Transforms that rewrite any method's merged tensor, one file each (LiNeS: :mod:`.lines`)."""
