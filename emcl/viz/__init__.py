"""Figures drawn from runs: the modality-gap figure, retrieval examples and training curves.

Every figure goes through :mod:`emcl.viz.plot` (matplotlib, Agg backend, one style, atomic PNG writes).
"""
