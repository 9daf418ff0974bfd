"""Load pretrained CLIP weights into a ``CLIPBackbone``, inferring the architecture from the weights.

Reads OpenAI's released TorchScript archives (``ViT-B-32.pt`` ...), plain state dicts in OpenAI's key names
(optionally nested under ``state_dict`` / ``model`` and prefixed, e.g. ``module.`` or ``clip.``), and
open_clip training checkpoints of the standard ``CLIP`` class. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .model import CLIPBackbone, build_clip, default_heads

_RELEASE = "https://openaipublic.azureedge.net/clip/models"
OPENAI_CLIP_URLS = {
    "ViT-B-32": f"{_RELEASE}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B-16": f"{_RELEASE}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L-14": f"{_RELEASE}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L-14-336px": (
        f"{_RELEASE}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt"
    ),
}
CLIP_DIR_ENV = "EMCL_CLIP_DIR"

_NAME_PATTERN = re.compile(r"^(ViT|RN)[A-Za-z0-9\-/@]*$", re.IGNORECASE)
_ANCHOR = "visual.conv1.weight"  # present in every OpenAI/open_clip CLIP (ViT and ResNet)
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def clip_search_dirs() -> list[Path]:
    """Folders searched for named weights: ``$EMCL_CLIP_DIR`` (if set), then ``~/.cache/clip``."""
    dirs = []
    if os.environ.get(CLIP_DIR_ENV):
        dirs.append(Path(os.environ[CLIP_DIR_ENV]).expanduser())
    dirs.append(Path.home() / ".cache" / "clip")
    return dirs


def _file_name(name: str) -> str:
    """``ViT-B/32`` -> ``ViT-B-32.pt``, ``ViT-L/14@336px`` -> ``ViT-L-14-336px.pt`` (OpenAI's file names)."""
    stem = name.replace("/", "-").replace("@", "-")
    canonical = {key.lower(): key for key in OPENAI_CLIP_URLS}
    return canonical.get(stem.lower(), stem) + ".pt"


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """Return the weights file for a path, or for a model name such as ``ViT-B/32`` looked up on disk."""
    text = os.fspath(path_or_name)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise IsADirectoryError(f"CLIP checkpoint path is not a file: {path}")
    if not _NAME_PATTERN.match(text):
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    file_name = _file_name(text)
    tried = [folder / file_name for folder in clip_search_dirs()]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    url = OPENAI_CLIP_URLS.get(file_name[: -len(".pt")])
    source = url or "OpenAI's CLIP release (https://github.com/openai/CLIP, clip/clip.py lists the URLs)"
    raise FileNotFoundError(
        f"CLIP weights {text!r} not found; tried: {', '.join(str(p) for p in tried)}. "
        f"Nothing is downloaded: fetch {file_name} from {source} and put it in ${CLIP_DIR_ENV} or "
        f"~/.cache/clip, or pass the file path."
    )


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl``; ``torch.save`` files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint file on the CPU: a TorchScript archive's state dict, else ``torch.load`` output."""
    path = Path(path)
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is OpenAI's release format
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any reader failure: say which file
        raise ValueError(f"cannot read CLIP checkpoint {path}: {error}") from error


def clip_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Extract CLIP's weights, in OpenAI key names, from a loaded checkpoint.

    Unwraps ``state_dict`` / ``model`` / ``module`` nesting and strips whatever prefix sits before
    ``visual.conv1.weight`` (``module.``, ``clip.``, ``module.clip.``), keeping only that model's keys.
    """
    state = checkpoint
    while isinstance(state, Mapping) and not _anchor_keys(state):
        wrappers = ("state_dict", "model", "module")
        nested = next((state[k] for k in wrappers if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, Mapping) or not _anchor_keys(state):
        keys = list(state)[:10] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{source}: no CLIP weights found (no key ending in {_ANCHOR!r}; found {keys})")
    prefixes = {key[: -len(_ANCHOR)] for key in _anchor_keys(state)}
    if len(prefixes) > 1:
        raise ValueError(f"{source}: several CLIP models found, under prefixes {sorted(prefixes)}")
    prefix = prefixes.pop()
    weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return {key: value for key, value in weights.items() if key not in _NON_WEIGHT_KEYS}


def _anchor_keys(state: Mapping) -> list[str]:
    return [k for k in state if isinstance(k, str) and (k == _ANCHOR or k.endswith("." + _ANCHOR))]


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)})


def infer_clip_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """``build_clip`` arguments for a CLIP state dict in OpenAI key names (as OpenAI's ``build_model``).

    Head counts cannot be read from weights: they follow OpenAI's ``width // 64`` rule (at least 1).
    """
    if "visual.proj" not in state:
        if any(key.startswith(("visual.layer1.", "visual.attnpool.")) for key in state):
            raise NotImplementedError(
                f"{source}: ModifiedResNet (RN50-style) visual tower; only ViT CLIP backbones are supported"
            )
        raise ValueError(f"{source}: no 'visual.proj' weight; not a ViT CLIP state dict")
    if "text_projection" not in state:
        if any(key.startswith("text.") for key in state):
            raise NotImplementedError(
                f"{source}: text tower stored under 'text.' (open_clip CustomTextCLIP); only the standard "
                "CLIP layout is supported"
            )
        raise ValueError(f"{source}: no 'text_projection' weight; not a CLIP state dict")
    try:
        conv1 = state["visual.conv1.weight"]
        vision_width = conv1.shape[0]
        vision_tokens = state["visual.positional_embedding"].shape[0]
        text_width = state["ln_final.weight"].shape[0]
        config = dict(
            embed_dim=state["text_projection"].shape[1],
            image_size=0,
            patch_size=conv1.shape[-1],
            vision_width=vision_width,
            vision_layers=_count_blocks(state, "visual.transformer.resblocks."),
            vision_heads=default_heads(vision_width),
            text_width=text_width,
            text_layers=_count_blocks(state, "transformer.resblocks."),
            text_heads=default_heads(text_width),
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            vision_mlp_ratio=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width,
            text_mlp_ratio=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
            nonscalar_logit_scale=state["logit_scale"].dim() > 0,
        )
    except KeyError as error:
        raise ValueError(f"{source}: CLIP weight {error.args[0]!r} is missing") from error
    grid = round((vision_tokens - 1) ** 0.5)
    if grid * grid + 1 != vision_tokens:
        raise ValueError(f"{source}: {vision_tokens} visual positions is not a square patch grid plus CLS")
    config["image_size"] = config["patch_size"] * grid
    return config


def load_clip(
    path_or_name: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    quick_gelu: bool = True,
) -> CLIPBackbone:
    """Load pretrained CLIP weights (file path, or a name like ``ViT-B/32`` found on disk) in float32.

    The architecture is inferred from the weights; heads default to ``width // 64`` and may be overridden.
    ``quick_gelu`` must match the weights' training (True for OpenAI's models).
    """
    path = resolve_checkpoint(path_or_name)
    state = clip_state_dict(read_checkpoint(path), source=str(path))
    config = infer_clip_config(state, source=str(path))
    if vision_heads is not None:
        config["vision_heads"] = vision_heads
    if text_heads is not None:
        config["text_heads"] = text_heads
    model = build_clip(**config, quick_gelu=quick_gelu)
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        message = f"{path}: weights do not fit the inferred CLIP architecture {config}: {error}"
        raise ValueError(message) from error
    return model.to(device)
