"""Evolutionary recipe search (mergekit-evolve): CMA-ES over a recipe's merge parameters.

:mod:`.genome` reads what to search; :mod:`.search` runs the trials (each a merge and a
fitness call) through Ray or in this process, resumable from its storage dir, and writes the
best recipe as YAML. The fitness is a callable on the merged model dir, given by the caller
(``splice evolve --scorer module:function``), or the bench's
validation accuracy (``--bench``, :mod:`splice.bench.fitness`).
"""

from splice.merge.evolve.genome import Genome, load_genome
from splice.merge.evolve.search import evolve

__all__ = ["Genome", "evolve", "load_genome"]
