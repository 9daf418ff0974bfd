"""EMCL: Expectation-Maximization Contrastive Learning for compact video-and-language representations.

The shared library: the EM layer (``emcl.em``), CLIP backbones (``emcl.clip``), the video data pipeline
(``emcl.data``), metrics, scoring, distributed helpers and training utilities (``emcl.train``).
"""

__version__ = "0.1.0"
