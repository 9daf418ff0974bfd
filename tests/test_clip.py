"""Tests for emcl.clip: tokenisation, frame normalisation, the backbone, weight loading and clip_config.

The pretrained-weight formats are fabricated from a tiny open_clip CLIP, which also serves as the reference
that our text path (short captions, no padding to 77) and frame path must reproduce.
"""

from __future__ import annotations

import fractions
import math
import warnings

import pytest
import torch
from open_clip.model import CLIP
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from emcl.clip import (
    CLIP_MEAN,
    CLIP_STD,
    EOT_TOKEN,
    SOT_TOKEN,
    CLIPBackbone,
    build_clip,
    default_heads,
    get_tokenizer,
    infer_clip_config,
    load_clip,
    normalize_frames,
    tokenize,
)
from emcl.errors import UserError

from ._clip_files import tiny_openai_clip, write_openai_archive

EMBED_DIM = 32
IMAGE, PATCH = 32, 8
VISION_WIDTH, TEXT_WIDTH = 96, 64
CAPTIONS = ["a diagram", "a man is playing a guitar on stage", "two dogs run across a snowy field"]
TINY = dict(
    embed_dim=EMBED_DIM, image_size=IMAGE, patch_size=PATCH, vision_width=64, vision_layers=2,
    text_width=64, text_layers=2,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reference() -> CLIP:
    """A tiny OpenAI-architecture CLIP (QuickGELU) built by open_clip itself, with fp16-exact weights."""
    return tiny_openai_clip(EMBED_DIM, IMAGE, PATCH, VISION_WIDTH, TEXT_WIDTH)


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory) -> dict:
    """The same weights as an OpenAI JIT archive, a plain state dict, an open_clip and an EMCL checkpoint."""
    folder = tmp_path_factory.mktemp("clip_weights")
    state = reference.state_dict()
    paths = {name: folder / f"{name}.pt" for name in ("jit", "plain", "open_clip", "emcl")}
    write_openai_archive(reference, paths["jit"])
    torch.save(state, paths["plain"])
    torch.save({"epoch": 3, "name": "tiny", "state_dict": {"module." + k: v for k, v in state.items()}},
               paths["open_clip"])
    emcl_state = {"clip." + k: v for k, v in state.items()}
    emcl_state["frame_position_embeddings.weight"] = torch.zeros(12, TEXT_WIDTH)
    torch.save({"model": emcl_state, "step": 10}, paths["emcl"])
    return paths


@pytest.fixture(scope="module")
def loaded(files) -> CLIPBackbone:
    return load_clip(files["jit"]).eval()


@pytest.fixture(scope="module")
def tiny() -> CLIPBackbone:
    torch.manual_seed(1)
    return build_clip(**TINY)


# ---------------------------------------------------------------------------------------- tokenizer
def test_tokenize_known_ids():
    ids, mask = tokenize("a diagram", max_words=8)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[SOT_TOKEN, 320, 22697, EOT_TOKEN, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]


def test_tokenize_batch_and_truncation():
    long_caption = " ".join(["a person slices tomatoes in a busy kitchen"] * 10)
    ids, mask = tokenize([CAPTIONS[0], long_caption, CAPTIONS[1]], max_words=32)
    assert ids.shape == mask.shape == (3, 32)
    expected = get_tokenizer().encode(long_caption)
    assert len(expected) > 30
    assert ids[1].tolist() == [SOT_TOKEN, *expected[:30], EOT_TOKEN]
    assert mask[1].sum() == 32
    assert mask.sum(1).tolist() == [4, 32, int((ids[2] > 0).sum())]
    assert (ids * (1 - mask)).abs().sum() == 0  # padding is zero
    assert (ids.argmax(1) == mask.sum(1) - 1).all()  # EOT is the largest id, at the last real token


@pytest.mark.parametrize("bad", ["", "   \n\t"])
def test_tokenize_empty_caption_raises(bad):
    with pytest.raises(ValueError, match="caption 1 is empty"):
        tokenize(["a dog", bad])


# ------------------------------------------------------------------------------------ normalisation
def test_normalize_frames():
    frames = torch.zeros(2, 4, 3, 5, 5, dtype=torch.uint8)
    frames[:, :, 0] = 255
    frames[:, :, 2] = 51
    out = normalize_frames(frames)
    assert out.dtype == torch.float32 and out.shape == frames.shape and out.device == frames.device
    values = (1.0, 0.0, 0.2)
    expected = [(values[c] - CLIP_MEAN[c]) / CLIP_STD[c] for c in range(3)]
    for channel in range(3):
        torch.testing.assert_close(out[:, :, channel], torch.full_like(out[:, :, channel], expected[channel]))
    assert normalize_frames(frames, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="uint8"):
        normalize_frames(frames.float())


# ----------------------------------------------------------------------------------------- backbone
def test_build_clip_accessors_and_keys(tiny, reference):
    assert (tiny.embed_dim, tiny.text_width, tiny.text_heads, tiny.text_layers) == (EMBED_DIM, 64, 1, 2)
    assert (tiny.vision_width, tiny.image_size, tiny.patch_size) == (64, IMAGE, PATCH)
    assert tiny.context_length == 77
    assert tiny.text_positional_embedding.shape == (77, 64)
    assert isinstance(tiny.text_positional_embedding, nn.Parameter)
    assert isinstance(tiny.text_blocks, nn.ModuleList) and len(tiny.text_blocks) == 2
    assert isinstance(tiny.logit_scale, nn.Parameter)
    assert tiny.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    # state-dict keys are exactly OpenAI's / open_clip's names, and the config rebuilds the model
    assert set(tiny.state_dict()) == set(reference.state_dict())
    rebuilt = build_clip(**tiny.config)
    rebuilt.load_state_dict(tiny.state_dict(), strict=True)
    heads = build_clip(**{**TINY, "text_width": 128, "text_heads": 4, "vision_heads": 2})
    assert (heads.text_heads, heads.vision_heads) == (4, 2)
    assert default_heads(32) == 1 and default_heads(768) == 12
    with pytest.raises(ValueError, match="not divisible"):
        build_clip(**{**TINY, "text_heads": 3})


def test_encode_text_matches_open_clip_on_77_tokens(loaded, reference):
    ids, mask = tokenize(CAPTIONS, max_words=32)
    padded = torch.zeros(len(CAPTIONS), 77, dtype=torch.long)
    padded[:, :32] = ids
    with torch.no_grad():
        expected = reference.encode_text(padded)
        by_argmax = loaded.encode_text(ids)
        by_mask, tokens = loaded.encode_text(ids, mask, return_tokens=True)
    assert by_argmax.shape == (3, EMBED_DIM)
    assert rel_err(by_argmax, expected) < 2e-3
    torch.testing.assert_close(by_mask, by_argmax)
    assert tokens.shape == (3, 32, TEXT_WIDTH)
    eot = mask.sum(1) - 1
    torch.testing.assert_close(tokens[torch.arange(3), eot] @ loaded.text_projection, by_argmax)


def test_encode_frames_matches_encode_image(loaded, reference):
    torch.manual_seed(2)
    frames = torch.randint(0, 256, (2, 3, 3, IMAGE, IMAGE), dtype=torch.uint8)
    pixels = normalize_frames(frames)
    with torch.no_grad():
        expected = reference.encode_image(pixels.flatten(0, 1)).view(2, 3, -1)
        features = loaded.encode_frames(pixels)
    assert features.shape == (2, 3, EMBED_DIM)
    assert rel_err(features, expected) < 2e-3
    with pytest.raises(TypeError, match="normalize_frames"):
        loaded.encode_frames(frames)


def test_encode_text_input_checks(tiny):
    with pytest.raises(ValueError, match="context length"):
        tiny.encode_text(torch.ones(1, 78, dtype=torch.long))
    ids, mask = tokenize(CAPTIONS[:2], max_words=16)
    mask[1] = 0
    with pytest.raises(ValueError, match="all zero in rows \\[1\\]"):
        tiny.encode_text(ids, mask)


def test_attention_goes_through_sdpa(tiny, monkeypatch):
    """nn.MultiheadAttention(need_weights=False) calls F.scaled_dot_product_attention on the training path."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kwargs):
        calls.append(None if attn_mask is None else tuple(attn_mask.shape[-2:]))
        return sdpa(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids, _ = tokenize(CAPTIONS, max_words=32)
    tiny.train()
    tiny.encode_text(ids).sum().backward()
    assert calls == [(32, 32)] * tiny.text_layers
    calls.clear()
    tiny.encode_frames(torch.randn(1, 2, 3, IMAGE, IMAGE)).sum().backward()
    assert calls == [None] * tiny.vision_layers
    tiny.zero_grad(set_to_none=True)


def test_fused_attention_kernel_accepts_text_mask(tiny):
    """With the math fallback disabled, the fused CPU kernel runs the sliced (L, L) causal mask."""
    ids, _ = tokenize(CAPTIONS, max_words=32)
    with torch.no_grad():
        expected = tiny.train().encode_text(ids)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fused = tiny.encode_text(ids)
    torch.testing.assert_close(fused, expected)


def test_grad_checkpointing_same_output_and_gradients():
    torch.manual_seed(3)
    model = build_clip(**TINY).train()
    ids, mask = tokenize(CAPTIONS, max_words=32)
    frames = torch.randn(2, 2, 3, IMAGE, IMAGE)
    block_calls = []
    # a pre-hook: recomputation stops early, once the saved tensors are rebuilt, so post-hooks do not run
    model.text_blocks[0].register_forward_pre_hook(lambda *_: block_calls.append(1))

    def run():
        model.zero_grad(set_to_none=True)
        block_calls.clear()
        text, video = model.encode_text(ids, mask), model.encode_frames(frames)
        (text.square().sum() + video.square().sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return text.detach(), video.detach(), grads, len(block_calls)

    text, video, grads, plain_calls = run()
    model.set_grad_checkpointing(True)
    text_ckpt, video_ckpt, grads_ckpt, ckpt_calls = run()
    model.set_grad_checkpointing(False)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block is recomputed in backward
    torch.testing.assert_close(text_ckpt, text)
    torch.testing.assert_close(video_ckpt, video)
    assert grads_ckpt.keys() == grads.keys()
    assert "transformer.resblocks.0.attn.in_proj_weight" in grads
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)
    assert grads["transformer.resblocks.0.attn.in_proj_weight"].abs().sum() > 0


# ------------------------------------------------------------------------------------------ loading
def test_jit_archive_is_openai_shaped(files):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(str(files["jit"])).state_dict()
    assert state["input_resolution"].item() == IMAGE
    assert {"context_length", "vocab_size", "visual.class_embedding", "visual.proj"} <= set(state)
    assert state["transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16


@pytest.mark.parametrize("kind", ["jit", "plain", "open_clip", "emcl"])
def test_load_formats_give_reference_weights(kind, files, reference):
    model = load_clip(files[kind])
    assert model.dtype == torch.float32
    assert model.config["quick_gelu"] is True
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_infer_config_from_weights(reference):
    config = infer_clip_config(reference.state_dict())
    assert config == dict(
        embed_dim=EMBED_DIM, image_size=IMAGE, patch_size=PATCH, vision_width=VISION_WIDTH, vision_layers=2,
        vision_heads=1, text_width=TEXT_WIDTH, text_layers=2, text_heads=1, context_length=77,
        vocab_size=49408, vision_mlp_ratio=4.0, text_mlp_ratio=4.0, nonscalar_logit_scale=False,
    )


def test_load_heads_override(files):
    assert load_clip(files["plain"], text_heads=2, vision_heads=3).text_heads == 2


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "weights" / "nope.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_clip(missing)


def test_name_lookup(files, tmp_path, monkeypatch):
    clip_dir, home = tmp_path / "clip_dir", tmp_path / "home"
    clip_dir.mkdir()
    monkeypatch.setenv("EMCL_CLIP_DIR", str(clip_dir))
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(FileNotFoundError) as error:
        load_clip("ViT-B/32")
    message = str(error.value)
    assert str(clip_dir / "ViT-B-32.pt") in message
    assert str(home / ".cache" / "clip" / "ViT-B-32.pt") in message
    assert "openaipublic.azureedge.net/clip/models/40d36571" in message
    (clip_dir / "ViT-B-32.pt").write_bytes(files["jit"].read_bytes())
    assert load_clip("ViT-B-32").image_size == IMAGE
    assert load_clip("ViT-B/32").image_size == IMAGE


def test_resnet_and_foreign_checkpoints_rejected(tmp_path):
    resnet = {
        "visual.conv1.weight": torch.zeros(32, 3, 3, 3),
        "visual.layer1.0.conv1.weight": torch.zeros(64, 32, 1, 1),
        "visual.attnpool.positional_embedding": torch.zeros(50, 256),
        "text_projection": torch.zeros(64, EMBED_DIM),
    }
    torch.save(resnet, tmp_path / "rn.pt")
    with pytest.raises(NotImplementedError, match="only ViT"):
        load_clip(tmp_path / "rn.pt")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: no CLIP weights"):
        load_clip(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read CLIP checkpoint .*garbage.pt"):
        load_clip(tmp_path / "garbage.pt")


def test_training_checkpoints_as_clip_weights(reference, tmp_path, caplog):
    """One of our training checkpoints (random states held as numpy arrays) given as CLIP weights: its CLIP
    part is read with a warning saying so; one without CLIP (MMT's) is refused in one line naming its task."""
    import numpy as np

    rng = [{"numpy": np.random.get_state(), "torch": torch.get_rng_state()}]
    config = {"task": "qa", "task_module": "video_question_answering.main_task_qa"}
    state = {"clip." + k: v for k, v in reference.state_dict().items()}
    torch.save({"task": "qa", "rng": rng, "model": state, "config": config}, tmp_path / "qa.pt")
    with caplog.at_level("WARNING", logger="emcl.clip"):
        model = load_clip(tmp_path / "qa.pt")
    assert torch.equal(model.state_dict()["visual.proj"], reference.state_dict()["visual.proj"])
    assert f"{tmp_path / 'qa.pt'} is a training checkpoint of EMCL-QA (task 'qa'): only its CLIP weights" \
        in caplog.text
    mmt = {"task": "joint", "rng": rng, "model": {"text.w": torch.zeros(2)}, "config": {"task": "joint"}}
    torch.save(mmt, tmp_path / "mmt.pt")
    with pytest.raises(UserError) as error:
        load_clip(tmp_path / "mmt.pt")
    assert str(error.value) == (
        f"{tmp_path / 'mmt.pt'} is a training checkpoint of MMT joint training (task 'joint'), not CLIP "
        "weights, and holds no CLIP: give OpenAI's CLIP release (e.g. ViT-B-32.pt) or an open_clip checkpoint"
    )
    assert isinstance(error.value, ValueError)  # older ``except ValueError`` callers still catch it


def test_loading_errors_are_one_line_user_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights\n")
    with pytest.raises(UserError) as error:
        load_clip(tmp_path / "notes.txt")
    assert str(error.value) == (
        f"cannot read CLIP checkpoint {tmp_path / 'notes.txt'}: not a file torch.save or TorchScript wrote"
    )
    torch.save({"model": {"x": fractions.Fraction(1, 3)}}, tmp_path / "pickled.pt")
    with pytest.raises(UserError) as error:
        load_clip(tmp_path / "pickled.pt")
    assert str(error.value) == (f"cannot read CLIP checkpoint {tmp_path / 'pickled.pt'}: it holds Python "
                                "objects besides tensors, which a weights file does not")
    with pytest.raises(UserError, match="not a file"):
        load_clip(tmp_path)  # a folder


# -------------------------------------------------------------------------------------------- clip_config
TINY_CLIP = {"embed_dim": 16, "image_size": 16, "patch_size": 8, "vision_width": 32, "vision_layers": 1,
             "vision_heads": 2, "text_width": 32, "text_layers": 1, "text_heads": 2}


def test_clip_config_typo_names_the_key_and_the_allowed_ones():
    from emcl.clip import build_clip_from_config, check_clip_config

    assert check_clip_config(TINY_CLIP) == TINY_CLIP
    bad = {**TINY_CLIP, "vision_widht": 32}
    with pytest.raises(UserError) as e:
        check_clip_config(bad, "configs/x.yaml: clip_config")
    msg = str(e.value)
    assert msg.startswith("configs/x.yaml: clip_config: unknown key(s) 'vision_widht'")
    assert "did you mean 'vision_width'?" in msg and "allowed keys: embed_dim, image_size" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(UserError, match="missing required key\\(s\\) text_layers"):
        check_clip_config({k: v for k, v in TINY_CLIP.items() if k != "text_layers"})
    with pytest.raises(UserError, match="vision_layers: expected a positive integer, got 1.5"):
        check_clip_config({**TINY_CLIP, "vision_layers": 1.5})
    with pytest.raises(UserError, match="quick_gelu: expected true or false"):
        check_clip_config({**TINY_CLIP, "quick_gelu": "yes"})
    with pytest.raises(UserError, match="clip_config: expected a mapping"):
        check_clip_config([1, 2])
    with pytest.raises(UserError, match="clip_config: vision width 32 is not divisible by vision heads 3"):
        build_clip_from_config({**TINY_CLIP, "vision_heads": 3})
    assert build_clip_from_config(TINY_CLIP).config["vision_width"] == 32
