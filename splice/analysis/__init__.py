"""Analyses that study models rather than change them (other.md §6–§8).

One file per method: ``geometry`` (tokenwise fits and metrics) and ``layer_geometry`` (the
study on a model), ``perturb`` (statistics-matched directions), ``nll_probe``, ``asa`` (the
layer sweep, judges and MASR/PASR/LASR), ``lapt`` (the perturbation-augmented loss; the
training itself runs in :mod:`splice.train.lapt`), ``mup`` (parametrisation rules and
wrapping), ``coord_check`` and ``hp_transfer``. Import the submodules directly.
"""
