"""Small backbones splice pretrains itself for the domain methods (issue #34), one per file.

Import from the module files (``splice.domains.backbones.<name>``); this package re-exports
nothing, so each backbone loads only when used.
"""
