"""Data pipeline: video decoding and sampling (``video``), the HDF5 frame cache (``cache``), JPEG frame
folders (``frames``), the clip-source interface over them (``sources``), clip-level augmentation
(``augment``), annotation loaders and datasets.

Kept free of imports on purpose: ``import emcl.data`` must stay cheap (scripts and DataLoader workers
import only the submodule they need).
"""
