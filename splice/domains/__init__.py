"""Domain methods of the seed on offline stand-ins (issue #34).

Tracking (LoRAT, SEATrack), point clouds (Point-PEFT), multi-task dense vision (TAP-SLF,
Polyhistor) and diffusion alignment (HyperAlign) adapt backbones that no offline package
ships, so splice pretrains small ones itself from packaged data. This stage holds the pure
pieces (backbone modules, the methods' modules and losses, metrics), one method per file;
the synthetic data lives in :mod:`splice.data`, pretraining and the benchmarks in
:mod:`splice.train` / :mod:`splice.bench`. Like the other wave-2 stages it may import only
foundation, io, deltas, adapters and probe.
"""
