"""Pretraining: schedules, optimiser parameter groups, teacher EMA, the SSL meta-architecture and the engine.

Import the submodules you need (e.g. ``from dinov2_repro.train.meta_arch import SSLMetaArch``); this package
file imports nothing so that ``import dinov2_repro.train`` stays light.
"""
