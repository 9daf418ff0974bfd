"""CLIP backbone for EMCL: tokenisation, frame normalisation, model construction and weight loading."""

from .loading import (
    OPENAI_CLIP_URLS,
    clip_state_dict,
    infer_clip_config,
    load_clip,
    read_checkpoint,
    resolve_checkpoint,
)
from .model import CLIPBackbone, build_clip, build_clip_from_config, check_clip_config, default_heads
from .preprocess import CLIP_MEAN, CLIP_STD, normalize_frames
from .tokenizer import EOT_TOKEN, SOT_TOKEN, get_tokenizer, tokenize

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "EOT_TOKEN",
    "OPENAI_CLIP_URLS",
    "SOT_TOKEN",
    "CLIPBackbone",
    "build_clip",
    "build_clip_from_config",
    "check_clip_config",
    "clip_state_dict",
    "default_heads",
    "get_tokenizer",
    "infer_clip_config",
    "load_clip",
    "normalize_frames",
    "read_checkpoint",
    "resolve_checkpoint",
    "tokenize",
]
