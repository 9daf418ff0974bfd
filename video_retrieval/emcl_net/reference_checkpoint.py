"""The authors' EMCL-Net checkpoints, and CLIP4Clip's (same layout), read into our EMCL-Net.

The reference's ``main_retrieval.py`` saves ``pytorch_model.bin.<epoch>``: the plain ``state_dict()`` of its
model, with no settings and no EM state (docs/reference.md, 'Checkpoint layouts'). Its keys:

- ``clip.*``: CLIP in OpenAI's key names (our ``clip.*`` takes them as they are);
- ``frame_position_embeddings.weight`` and ``transformerClip.resblocks.<i>.*`` (``seqTransf``);
- ``lstm_visual.*`` (``seqLSTM``; the file also holds frame positions, which that forward never reads);
- none of these for ``None`` / ``meanP``.

A ``module.`` prefix (saved from DDP) is stripped and fp16 tensors become fp32. The architecture is read
from the keys and shapes; every key must be accounted for (the reference loads with ``strict=False``,
which silently leaves layers random: we do not).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from emcl.clip.loading import infer_clip_config
from emcl.errors import UserValueError
from emcl.train.settings import state_dict_mismatch

log = logging.getLogger(__name__)

FORMAT = "reference"  # how metrics.json and logs name a checkpoint of this layout
_ANCHOR = "clip.visual.conv1.weight"
_FRAME_POSITIONS = "frame_position_embeddings.weight"
# (reference prefix, our prefix)
_RENAMES = (
    ("clip.", "clip."),
    (_FRAME_POSITIONS, "agg.position.weight"),
    ("transformerClip.resblocks.", "agg.blocks."),
    ("lstm_visual.", "agg.lstm."),
)
_NOT_WEIGHTS = ("clip.input_resolution", "clip.context_length", "clip.vocab_size")  # OpenAI JIT extras


@dataclass
class ReferenceCheckpoint:
    """A reference-layout file: its weights in our key names (fp32, no ``emcl.mu``) and its architecture."""

    state: dict[str, torch.Tensor]
    arch: dict[str, Any]  # clip_config (without heads), agg_module (None: no aggregation keys), agg_layers
    source: str
    unused: list[str] = field(default_factory=list)  # reference keys its own forward never reads
    format: str = FORMAT

    def load_into(self, model: torch.nn.Module) -> None:
        load_reference_state(model, self)

    def metrics(self, cfg: Any) -> dict[str, Any]:
        """What ``metrics.json`` records of a run that started from this file."""
        em_state = f"drawn from --seed {cfg.seed} (em_init {cfg.em_init}): the checkpoint holds none"
        return {"init_model_format": self.format, "em_state": em_state}


def is_reference_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is a plain reference/CLIP4Clip state dict (not one of our checkpoints)."""
    if not isinstance(obj, Mapping) or "model" in obj or "config" in obj:
        return False
    return any(isinstance(k, str) and k.removeprefix("module.") == _ANCHOR for k in obj)


def _strip_ddp_prefix(obj: Mapping[str, Any], source: str) -> dict[str, Any]:
    prefixed = [k for k in obj if k.startswith("module.")]
    if not prefixed:
        return dict(obj)
    if len(prefixed) != len(obj):
        plain = next(k for k in obj if not k.startswith("module."))
        raise UserValueError(
            f"{source}: some keys carry the DDP prefix 'module.' and some not (e.g. {plain!r})"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def to_ours(key: str) -> str | None:
    """Our EMCL-Net key for a reference key (None: not a key of the reference's EMCL-Net)."""
    for theirs, ours in _RENAMES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def to_reference(key: str) -> str:
    """The reference's name of one of our EMCL-Net keys (for messages in the file's own terms)."""
    for theirs, ours in _RENAMES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def _aggregation(keys: list[str], source: str) -> tuple[str | None, int | None]:
    layers = {k.split(".")[2] for k in keys if k.startswith("transformerClip.resblocks.")}
    lstm = any(k.startswith("lstm_visual.") for k in keys)
    if layers and lstm:
        raise UserValueError(
            f"{source}: holds both transformerClip (seqTransf) and lstm_visual (seqLSTM) keys"
        )
    if layers:
        return "seqTransf", len(layers)
    if lstm:
        return "seqLSTM", None
    return None, None


def read_reference_checkpoint(obj: Mapping[str, Any], source: str) -> ReferenceCheckpoint:
    """Convert a loaded reference/CLIP4Clip state dict; unknown keys are an error naming them."""
    raw = _strip_ddp_prefix(obj, source)
    raw = {k: v for k, v in raw.items() if k not in _NOT_WEIGHTS}
    unknown = [k for k in raw if to_ours(k) is None]
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise UserValueError(
            f"{source}: unexpected key(s) for a reference EMCL-Net / CLIP4Clip checkpoint: "
            f"{', '.join(unknown[:5])}{more}"
        )
    agg, layers = _aggregation(list(raw), source)
    unused = [_FRAME_POSITIONS] if agg == "seqLSTM" and _FRAME_POSITIONS in raw else []
    clip = {k[len("clip."):]: v for k, v in raw.items() if k.startswith("clip.")}
    try:
        clip_config = infer_clip_config(clip, source=source)
    except ValueError as e:
        raise UserValueError(str(e)) from None
    for name in ("vision_heads", "text_heads"):  # not in the weights: the config's, else width // 64
        clip_config.pop(name)
    clip_config["quick_gelu"] = True  # OpenAI CLIP, as the reference builds it
    state = {to_ours(k): v.float() if v.is_floating_point() else v for k, v in raw.items() if k not in unused}
    arch = {"clip_config": clip_config, "agg_module": agg, "agg_layers": layers}
    return ReferenceCheckpoint(state=state, arch=arch, source=source, unused=unused)


def _conflict(key: str, given: Any, found: Any, source: str) -> UserValueError:
    return UserValueError(f"{key}: {given!r} in the config, {found!r} in {source}: remove the setting or use "
                          f"another checkpoint")


def settle_architecture(ref: ReferenceCheckpoint, cfg: Any, configured: set[str]) -> None:
    """Set ``cfg``'s architecture (and the frame size its CLIP takes) from the file. A value the user set
    (config file or flag) that the file contradicts is an error naming both; CLIP's head counts and
    activation, which weights do not show, come from the user's ``clip_config`` when it gives them."""
    agg, layers = ref.arch["agg_module"], ref.arch["agg_layers"]
    if agg is None:  # no aggregation weights: the reference's 'None', or CLIP4Clip's mean pooling
        agg = cfg.agg_module if cfg.agg_module in ("None", "meanP") else "None"
        if "agg_module" in configured and cfg.agg_module != agg:
            found = "no aggregation weights (None or meanP)"
            raise _conflict("agg_module", cfg.agg_module, found, ref.source)
    elif "agg_module" in configured and cfg.agg_module != agg:
        raise _conflict("agg_module", cfg.agg_module, agg, ref.source)
    if layers is not None and "agg_layers" in configured and cfg.agg_layers != layers:
        raise _conflict("agg_layers", cfg.agg_layers, layers, ref.source)
    clip_config = dict(ref.arch["clip_config"])
    given = dict(cfg.clip_config or {}) if "clip_config" in configured else {}
    for key, found in clip_config.items():
        if key in given and key != "quick_gelu" and given[key] != found:
            raise _conflict(f"clip_config.{key}", given[key], found, ref.source)
    clip_config.update({k: given[k] for k in ("vision_heads", "text_heads", "quick_gelu") if k in given})
    size = clip_config["image_size"]  # frames are resized to what the file's CLIP takes
    if "image_size" in configured and cfg.image_size != size:
        raise _conflict("image_size", cfg.image_size, size, ref.source)
    cfg.image_size = size
    if "clip_path" in configured and "clip_config" not in configured:
        log.info("%s: CLIP comes from the checkpoint; clip_path %r is not read", ref.source, cfg.clip_path)
    cfg.clip_config, cfg.agg_module = clip_config, agg
    if layers is not None:
        cfg.agg_layers = layers


def load_reference_state(model: torch.nn.Module, ref: ReferenceCheckpoint) -> None:
    """Load the file's weights into ``model``; ``emcl.mu`` keeps the model's own draw from the run seed
    (the file has none). Missing or unexpected keys, or other shapes, are an error in the file's names."""
    expected = model.state_dict()
    state = dict(ref.state)
    if "emcl.mu" in expected:
        state["emcl.mu"] = expected["emcl.mu"]
    why = state_dict_mismatch({to_reference(k): v for k, v in expected.items()},
                              {to_reference(k): v for k, v in state.items()})
    if why:
        raise UserValueError(f"{ref.source} does not fit the EMCL-Net its keys describe: {why}")
    model.load_state_dict(state)


def adopt_reference_checkpoint(
    obj: Any, source: str, cfg: Any, configured: set[str]
) -> ReferenceCheckpoint | None:
    """A reference/CLIP4Clip file, read and with ``cfg``'s architecture settled from it; None for ours."""
    if not is_reference_checkpoint(obj):
        return None
    ref = read_reference_checkpoint(obj, source)
    settle_architecture(ref, cfg, configured)
    layers = f", {cfg.agg_layers} layers" if cfg.agg_module == "seqTransf" else ""
    log.info("%s: a reference EMCL-Net / CLIP4Clip checkpoint (agg_module %s%s); it holds no EM state, so "
             "mu is drawn from --seed %s (em_init %s)", source, cfg.agg_module, layers, cfg.seed, cfg.em_init)
    for key in ref.unused:
        log.info("%s: %s is not used by the reference's %s forward; left out", source, key, cfg.agg_module)
    return ref
