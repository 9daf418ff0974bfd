"""Load pretrained CLIP weights into a ``CLIPBackbone``, inferring the architecture from the weights.

Reads OpenAI's released TorchScript archives (``ViT-B-32.pt`` ...), plain state dicts in OpenAI's key names
(optionally nested under ``state_dict`` / ``model`` and prefixed, e.g. ``module.`` or ``clip.``), and
open_clip training checkpoints of the standard ``CLIP`` class. Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from emcl.errors import UserError, UserValueError, describe_task

from .model import CLIPBackbone, build_clip, default_heads

log = logging.getLogger("emcl.clip")

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
# what the random states in our training checkpoints pickle besides tensors (numpy arrays and dtypes)
_NUMPY_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                  "numpy.core.multiarray._reconstruct")


class UnsupportedCLIPError(UserError, NotImplementedError):
    """CLIP weights of an architecture this code does not build (ResNet towers, open_clip's custom text)."""


class NotAFileError(UserError, IsADirectoryError):
    """A CLIP path that exists but is a folder."""


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
        raise NotAFileError(f"CLIP checkpoint path is not a file: {path}")
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


def _numpy_globals(path: Path) -> list[Any] | None:
    """The numpy array and dtype classes a training checkpoint's random states need, to be allowed in a
    weights-only load; None when the file needs anything else (or is not a ``torch.save`` zip file)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return None
    if not names or not all(n in _NUMPY_GLOBALS or n.startswith("numpy.dtypes.") for n in names):
        return None
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]  # pickled by class
    return [np.ndarray, np.dtype, multiarray.multiarray._reconstruct, *dtypes]


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint file on the CPU: a TorchScript archive's state dict, else ``torch.load`` output
    (weights only; numpy arrays allowed too, which our training checkpoints hold in their random states).
    A file that cannot be read is a one-line :class:`~emcl.errors.UserValueError` naming it."""
    path = Path(path)
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is OpenAI's release format
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            allowed = _numpy_globals(path)
            if allowed is None:
                raise
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any reader failure: say which file, in one line
        text = str(error).strip()
        if not zipfile.is_zipfile(path) and not _is_legacy_torch(path):
            text = "not a file torch.save or TorchScript wrote"
        elif isinstance(error, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
            text = "it holds Python objects besides tensors, which a weights file does not"
        why = text.splitlines()[0] if text else type(error).__name__
        raise UserValueError(f"cannot read CLIP checkpoint {path}: {why}") from error


def _is_legacy_torch(path: Path) -> bool:
    """``torch.save``'s pre-1.6 format starts with a pickled magic number (protocol 2: bytes 0x80 0x02)."""
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x80\x02"


def _training_task(checkpoint: Any) -> str | None:
    """The task of one of our training checkpoints (``task``, or its config's), else None."""
    if not isinstance(checkpoint, Mapping):
        return None
    config = checkpoint.get("config")
    task = checkpoint.get("task") or (config.get("task") if isinstance(config, Mapping) else None)
    return str(task) if task else None


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
        task = _training_task(checkpoint)
        if task is not None:
            raise UserValueError(
                f"{source} is a training checkpoint of {describe_task(task)}, not CLIP weights, and holds "
                "no CLIP: give OpenAI's CLIP release (e.g. ViT-B-32.pt) or an open_clip checkpoint"
            )
        keys = list(state)[:10] if isinstance(state, Mapping) else type(state).__name__
        raise UserValueError(f"{source}: no CLIP weights found (no key ending in {_ANCHOR!r}; found {keys})")
    prefixes = {key[: -len(_ANCHOR)] for key in _anchor_keys(state)}
    if len(prefixes) > 1:
        raise UserValueError(f"{source}: several CLIP models found, under prefixes {sorted(prefixes)}")
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
            raise UnsupportedCLIPError(
                f"{source}: ModifiedResNet (RN50-style) visual tower; only ViT CLIP backbones are supported"
            )
        raise UserValueError(f"{source}: no 'visual.proj' weight; not a ViT CLIP state dict")
    if "text_projection" not in state:
        if any(key.startswith("text.") for key in state):
            raise UnsupportedCLIPError(
                f"{source}: text tower stored under 'text.' (open_clip CustomTextCLIP); only the standard "
                "CLIP layout is supported"
            )
        raise UserValueError(f"{source}: no 'text_projection' weight; not a CLIP state dict")
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
        raise UserValueError(f"{source}: CLIP weight {error.args[0]!r} is missing") from error
    grid = round((vision_tokens - 1) ** 0.5)
    if grid * grid + 1 != vision_tokens:
        raise UserValueError(f"{source}: {vision_tokens} visual positions is not a square patch grid plus "
                             "CLS")
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
    checkpoint = read_checkpoint(path)
    state = clip_state_dict(checkpoint, source=str(path))
    task = _training_task(checkpoint)
    if task is not None:  # allowed (a fine-tuned backbone), but not what CLIP weights usually are: said
        log.warning("%s is a training checkpoint of %s: only its CLIP weights are read, as the pretrained "
                    "backbone (--init_model loads a whole checkpoint of the same task)",
                    path, describe_task(task))
    del checkpoint
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
        lines = [line.strip() for line in str(error).strip().splitlines()]
        why = "; ".join(lines[1:]) or lines[0]  # torch's header line, then one line per kind of mismatch
        why = why if len(why) <= 400 else why[:400] + " ..."
        raise UserValueError(f"{path}: weights do not fit the inferred CLIP architecture {config}: {why}") \
            from error
    return model.to(device)
