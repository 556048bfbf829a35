"""The CLIP builder, local-file loader, dense visual forward and the ``clip`` stage artifact."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from weakclip_core.models.clip import (ClipWeightsError, arch_model_config, build_clip, clip_from_config,
                                      dense_visual_features, interpolated_positional_embedding,
                                      load_clip_artifact, load_clip_file, save_clip_artifact)
from weakclip_core.config.clip import ClipArchConfig, ClipConfig

TINY_ARCH = ClipArchConfig(embed_dim=32, image_size=64, patch_size=16, vision_width=32, vision_layers=4,
                           vision_head_width=16, text_width=32, text_layers=1, text_heads=2, context_length=16)
TINY_NAME = "WeakclipTestTiny"


@pytest.fixture(scope="module")
def tiny_registered(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register the tiny arch under a name, as a user would for a named open_clip architecture."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(arch_model_config(TINY_ARCH)))
    open_clip.add_model_config(folder)
    return TINY_NAME


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_clip(ClipConfig(source="random", arch=TINY_ARCH)).eval()


def test_arch_is_built_with_every_size_field() -> None:
    model = build_clip(ClipConfig(source="pretrain"))  # the synthetic default arch
    arch = ClipArchConfig()
    assert model.visual.conv1.out_channels == arch.vision_width
    assert model.visual.conv1.kernel_size == (arch.patch_size, arch.patch_size)
    assert len(model.visual.transformer.resblocks) == arch.vision_layers == 12
    assert model.visual.transformer.resblocks[0].attn.num_heads == arch.vision_width // arch.vision_head_width
    assert model.token_embedding.embedding_dim == arch.text_width
    assert len(model.transformer.resblocks) == arch.text_layers
    assert model.positional_embedding.shape[0] == arch.context_length
    assert model.visual.proj.shape == (arch.vision_width, arch.embed_dim)
    # the paper's taps 3/5/7/11 exist on the synthetic arch
    features = dense_visual_features(model.visual, torch.randn(1, 3, 64, 64), [3, 5, 7, 11])
    assert [tuple(tap.shape) for tap in features.taps] == [(1, arch.vision_width, 4, 4)] * 4


def test_dense_features_match_open_clip_at_native_size() -> None:
    model = tiny_clip()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = dense_visual_features(model.visual, images, [1, 3])
        reference = model.visual.forward_intermediates(images, indices=[1, 3], output_fmt="NCHW")
        pooled = model.encode_image(images)
    torch.testing.assert_close(features.taps[0], reference["image_intermediates"][0])
    torch.testing.assert_close(features.taps[1], reference["image_intermediates"][1])
    torch.testing.assert_close(features.global_embedding, pooled)
    assert features.patch_embeddings.shape == (2, 32, 4, 4)


def test_dense_features_at_another_size_and_tap_order() -> None:
    model = tiny_clip()
    with torch.no_grad():
        features = dense_visual_features(model.visual, torch.randn(1, 3, 96, 128), [3, 0])
    assert features.taps[0].shape == (1, 32, 6, 8) and features.patch_embeddings.shape == (1, 32, 6, 8)
    assert all(torch.isfinite(tap).all() for tap in features.taps)
    with pytest.raises(ValueError, match="taps"):
        dense_visual_features(model.visual, torch.randn(1, 3, 64, 64), [4])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dense_visual_features(model.visual, torch.randn(1, 3, 70, 64), [0])


def test_positional_interpolation_of_a_linear_ramp() -> None:
    """A positional embedding that is linear in x stays linear (bilinear resize), class slot untouched."""
    model = tiny_clip()
    side = 4
    ramp = np.tile(np.arange(side, dtype=np.float32), (side, 1))  # value = x
    patch_positions = torch.from_numpy(ramp.reshape(-1, 1)).repeat(1, 32)
    with torch.no_grad():
        model.visual.positional_embedding.copy_(torch.cat([torch.full((1, 32), 7.0), patch_positions]))
    resized = interpolated_positional_embedding(model.visual, 4, 8).detach().numpy()
    assert np.allclose(resized[0], 7.0)
    grid = resized[1:, 0].reshape(4, 8)
    # align_corners=False: new x at (j + 0.5) / 2 - 0.5 in old coordinates, clamped to [0, 3]
    expected_x = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
    assert np.allclose(grid, np.tile(expected_x, (4, 1)), atol=1e-6)


@pytest.mark.parametrize("tag", ["openai", "laion2b_s34b_b88k", "hf-hub:timm/vit_base_patch16_clip_224.openai"])
def test_hub_tags_are_refused_at_once(tag: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ClipWeightsError, match="Download the CLIP checkpoint yourself") as error:
        load_clip_file("ViT-B-16", tag)
    assert time.perf_counter() - started < 2.0
    assert tag in str(error.value)
    with pytest.raises(ClipWeightsError):
        build_clip(ClipConfig(source="file", weights=tag))


def test_bogus_file_is_refused_with_its_name(tmp_path: Path) -> None:
    bogus = tmp_path / "ViT-B-16.pt"
    bogus.write_text("this is not a checkpoint")
    with pytest.raises(ClipWeightsError, match="not a readable CLIP checkpoint") as error:
        load_clip_file("ViT-B-16", bogus)
    assert str(bogus) in str(error.value)


def test_unknown_architecture_name_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, weights)
    with pytest.raises(ClipWeightsError, match="not an open_clip architecture"):
        load_clip_file("ViT-Nope-99", weights)


@pytest.mark.parametrize("fmt", ["pt", "wrapped_pt", "safetensors"])
def test_local_checkpoint_loads_exactly(tmp_path: Path, tiny_registered: str, fmt: str) -> None:
    source = tiny_clip(seed=3)
    state = {key: value.clone().contiguous() for key, value in source.state_dict().items()}
    path = tmp_path / f"tiny.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "wrapped_pt":
        torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}}, path)
    else:
        torch.save(state, path)
    loaded = load_clip_file(tiny_registered, path)
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path, tiny_registered: str) -> None:
    other = clip_from_config(arch_model_config(replace(TINY_ARCH, vision_width=48, vision_head_width=16)))
    path = tmp_path / "other_arch.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(ClipWeightsError, match="does not match the open_clip architecture") as error:
        load_clip_file(tiny_registered, path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)  # one line, not torch's tab-indented list


def register_tiny_configs(tmp_path: Path, quick_gelu_name: str | None, gelu_name: str) -> dict:
    """The tiny CLIP's config registered with open_clip under a QuickGELU name (unless ``None``) and a GELU one,
    as ``clip.model_name`` reads them; returns the GELU config."""
    folder = tmp_path / "configs"
    folder.mkdir()
    config = arch_model_config(TINY_ARCH)
    if quick_gelu_name is not None:
        (folder / f"{quick_gelu_name}.json").write_text(json.dumps({**config, "quick_gelu": True}))
    (folder / f"{gelu_name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return config


def test_an_openai_torchscript_archive_needs_the_quickgelu_architecture(tmp_path: Path) -> None:
    """OpenAI's ``ViT-B-16.pt`` is a TorchScript archive of QuickGELU blocks. Into the QuickGELU architecture it
    loads exactly; into the GELU one of the same name without ``-quickgelu`` (params.yaml's default) its tensors
    fit too, so it used to load without a word into a CLIP computing another function: now refused, naming the key
    and the architecture to use. The archive here is a tiny open_clip CLIP traced to TorchScript, without the
    text mask buffer (OpenAI's archives hold none)."""
    config = register_tiny_configs(tmp_path, "WeakclipTestTinyQ", "WeakclipTestTinyG")
    torch.manual_seed(4)
    model = clip_from_config({**config, "quick_gelu": True}).eval()
    model._buffers.pop("attn_mask")
    archive = tmp_path / "tiny_openai.pt"
    torch.jit.trace_module(model, {"encode_image": torch.zeros(1, 3, 64, 64)}, check_trace=False).save(str(archive))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_clip_file("WeakclipTestTinyQ", archive)
    assert not [w for w in caught if "torch.jit.load" in str(w.message)]  # torch's deprecation: not the user's to act on
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ClipWeightsError) as refused:
        load_clip_file("WeakclipTestTinyG", archive)
    assert str(refused.value) == (f"clip.weights: '{archive}' is an OpenAI TorchScript archive, whose blocks use "
                                  "QuickGELU, but clip.model_name 'WeakclipTestTinyG' builds GELU blocks; set "
                                  "clip.model_name: WeakclipTestTinyG-quickgelu")


@pytest.mark.parametrize("layout", ["openai_state_dict", "open_clip_folder"])
def test_openai_weights_as_a_plain_state_dict_need_the_quickgelu_architecture_too(tmp_path: Path,
                                                                                 layout: str) -> None:
    """OpenAI's weights outside a TorchScript archive: the archive's state dict saved as it is (``torch.jit.load
    (...).state_dict()`` keeps OpenAI's ``input_resolution`` / ``context_length`` / ``vocab_size`` entries) or
    open_clip's hub folder of them (``open_clip_pytorch_model.bin`` beside an ``open_clip_config.json`` whose
    ``model_cfg`` sets ``quick_gelu``). Both used to load into GELU blocks without a word; now refused as the
    archive is, and the QuickGELU architecture loads them exactly."""
    config = register_tiny_configs(tmp_path, "WeakclipTestTinyQ2", "WeakclipTestTinyG2")
    torch.manual_seed(4)
    model = clip_from_config({**config, "quick_gelu": True}).eval()
    state = dict(model.state_dict())
    if layout == "openai_state_dict":
        weights = tmp_path / "ViT-tiny-openai.pt"
        state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
        evidence = "holds the state dict of OpenAI's TorchScript archive (its input_resolution / context_length /"
    else:
        weights = tmp_path / "hub" / "open_clip_pytorch_model.bin"
        weights.parent.mkdir()
        (weights.parent / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**config, "quick_gelu": True}}))
        evidence = f"comes with {weights.parent / 'open_clip_config.json'}, whose model_cfg sets quick_gelu: true"
    torch.save(state, weights)
    with pytest.raises(ClipWeightsError) as refused:
        load_clip_file("WeakclipTestTinyG2", weights)
    assert str(refused.value).startswith(f"clip.weights: '{weights}' {evidence}")
    assert str(refused.value).endswith("but clip.model_name 'WeakclipTestTinyG2' builds GELU blocks; set "
                                       "clip.model_name: WeakclipTestTinyG2-quickgelu")
    loaded = load_clip_file("WeakclipTestTinyQ2", weights)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_plain_state_dict_without_openais_marks_loads_into_gelu_blocks(tmp_path: Path) -> None:
    """open_clip's own GELU checkpoints (LAION's) carry none of those marks: they load as named."""
    register_tiny_configs(tmp_path, None, "WeakclipTestTinyG3")
    model = tiny_clip(seed=6)
    weights = tmp_path / "laion.bin"
    torch.save(model.state_dict(), weights)
    loaded = load_clip_file("WeakclipTestTinyG3", weights)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_artifact_round_trip(tmp_path: Path) -> None:
    model = tiny_clip(seed=5)
    cfg = ClipConfig(source="random", arch=TINY_ARCH)
    save_clip_artifact(tmp_path / "clip", model, cfg, info={"epochs": 0})
    rebuilt = load_clip_artifact(tmp_path / "clip")
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt.encode_image(images), model.encode_image(images))
    info = json.loads((tmp_path / "clip" / "clip.json").read_text())
    assert info["source"] == "random" and info["epochs"] == 0
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


def test_file_artifact_records_sha256(tmp_path: Path, tiny_registered: str) -> None:
    weights = tmp_path / "tiny.pt"
    torch.save(tiny_clip(seed=1).state_dict(), weights)
    cfg = ClipConfig(source="file", model_name=tiny_registered, weights=str(weights))
    model = build_clip(cfg)
    save_clip_artifact(tmp_path / "clip", model, cfg)
    info = json.loads((tmp_path / "clip" / "clip.json").read_text())
    assert info["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    rebuilt = load_clip_artifact(tmp_path / "clip")
    assert torch.equal(rebuilt.visual.proj, model.visual.proj)


def test_a_half_precision_file_is_stored_half_and_loads_to_the_same_model(tmp_path: Path,
                                                                         tiny_registered: str) -> None:
    """OpenAI's ViT-B/16 keeps its matrices in fp16 and others (norms) in fp32. The artifact of such a
    file stores the fp16 tensors as fp16 (it used to store the fp32 model: twice the file's size) and rebuilds
    the fp32 model bit for bit; a fp32 file's tensors that fp16 cannot hold stay fp32."""
    source = tiny_clip(seed=2)
    mixed = {key: value.half() if value.ndim >= 2 else value.clone()  # matrices fp16, norms and biases fp32
             for key, value in source.state_dict().items()}
    weights = tmp_path / "openai_like.pt"
    torch.save(mixed, weights)
    cfg = ClipConfig(source="file", model_name=tiny_registered, weights=str(weights))
    model = build_clip(cfg)
    save_clip_artifact(tmp_path / "clip", model, cfg)
    stored = torch.load(tmp_path / "clip" / "weights.pt", weights_only=True)
    half_keys = {key for key, value in mixed.items() if value.dtype == torch.float16}
    assert half_keys and all(stored[key].dtype == torch.float16 for key in half_keys)
    # (fp32 tensors fp16 holds exactly, e.g. a norm's ones and zeros, may be stored fp16 too: no bit is lost)
    rebuilt = load_clip_artifact(tmp_path / "clip")
    for key, value in model.state_dict().items():
        assert rebuilt.state_dict()[key].dtype == value.dtype and torch.equal(rebuilt.state_dict()[key], value), key
    fp32_bytes = sum(value.numel() * 4 for value in mixed.values() if value.is_floating_point())
    half_bytes = sum(value.numel() * value.element_size() for value in mixed.values() if value.is_floating_point())
    assert half_bytes < 0.6 * fp32_bytes  # the matrices are most of the model
    assert (tmp_path / "clip" / "weights.pt").stat().st_size < half_bytes + 200_000  # tensors plus the archive

    full = tmp_path / "fp32.pt"
    torch.save(source.state_dict(), full)  # random fp32 values: fp16 holds almost none exactly
    cfg = ClipConfig(source="file", model_name=tiny_registered, weights=str(full))
    save_clip_artifact(tmp_path / "clip32", build_clip(cfg), cfg)
    stored = torch.load(tmp_path / "clip32" / "weights.pt", weights_only=True)
    assert stored["visual.proj"].dtype == torch.float32 and torch.equal(stored["visual.proj"], source.visual.proj)


def test_missing_artifact_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        load_clip_artifact(tmp_path / "nothing")


def test_the_clip_stage_names_the_activation_its_architecture_builds() -> None:
    """A plain state dict of OpenAI's weights (``clip.load(..., jit=False)``) carries no sign of QuickGELU, so the
    ``clip`` stage's summary says which activation ``clip.model_name`` builds (open_clip's ViT-B-16 configs)."""
    from pipeline.clip import activation_note

    assert activation_note("ViT-B-16-quickgelu") == "ViT-B-16-quickgelu builds QuickGELU blocks (OpenAI's weights)"
    assert activation_note("ViT-B-16").startswith("ViT-B-16 builds GELU blocks (LAION's weights; OpenAI's need "
                                                  "ViT-B-16-quickgelu")
