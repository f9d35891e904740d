"""Where to tune: choose the weights, entries or layers that train (spec peft.md §10–12, §15).

One file per method: :mod:`.spt` (sensitivity-aware allocation), :mod:`.rdp` (layer selection
by Ramer–Douglas–Peucker on the hidden-state path), :mod:`.id3` (incremental unmasking, an
optimizer wrapper), :mod:`.autopeft` (configuration search). Each produces a scope for the
adapter framework (``splice.adapters.inject`` with ``layers=``/targets, or the ``sparse``
adapter), never a second adapter implementation; the training side (``splice train
--select``) calls into these.
"""
