"""Issue #18, item 3: a released MCTformer-V2 checkpoint (xulianuwa/MCTformer, V2 ``models.py``) loads into our
model. The state dict is generated here from the reference's module definitions — its key names and
shapes written out by hand, not taken from our module — and the forward pass is checked against a
functional re-statement of the reference's ``forward`` (written for this test from its definition)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from weakclip_core.models.reference_checkpoints import ReferenceCheckpointError, load_reference_mctformer

C, D, DEPTH, PATCH, GRID, HEADS = 3, 32, 2, 8, 4, 4  # a small MCTformer-V2 (DeiT-S: D 384, 12 blocks, 6 heads)


def reference_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """``MCTformerV2(VisionTransformer)``'s state dict: names and shapes from its ``__init__`` and the base
    ViT's (``qkv_bias=True``, mlp_ratio 4, the base ViT's unused final ``norm``, ``head`` a 3x3 conv to C)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.2

    state = {"cls_token": rand(1, C, D), "pos_embed": rand(1, C + GRID * GRID, D),
             "patch_embed.proj.weight": rand(D, 3, PATCH, PATCH), "patch_embed.proj.bias": rand(D)}
    for index in range(DEPTH):
        prefix = f"blocks.{index}."
        state.update({prefix + "norm1.weight": 1 + rand(D), prefix + "norm1.bias": rand(D),
                      prefix + "attn.qkv.weight": rand(3 * D, D), prefix + "attn.qkv.bias": rand(3 * D),
                      prefix + "attn.proj.weight": rand(D, D), prefix + "attn.proj.bias": rand(D),
                      prefix + "norm2.weight": 1 + rand(D), prefix + "norm2.bias": rand(D),
                      prefix + "mlp.fc1.weight": rand(4 * D, D), prefix + "mlp.fc1.bias": rand(4 * D),
                      prefix + "mlp.fc2.weight": rand(D, 4 * D), prefix + "mlp.fc2.bias": rand(D)})
    state.update({"norm.weight": 1 + rand(D), "norm.bias": rand(D), "head.weight": rand(C, D, 3, 3),
                  "head.bias": rand(C)})
    return state


def reference_forward(state: dict[str, torch.Tensor], images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The reference ``MCTformerV2.forward`` (eval, at the trained grid): patch conv, class tokens first,
    + pos_embed, pre-norm blocks (softmax attention over heads, GELU MLP, LayerNorm eps 1e-6), no final
    norm; class logits = mean over channels of the class tokens; PatchCAM = 3x3 conv, logits = its GAP."""
    batch = images.shape[0]
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(batch, -1, -1), x], dim=1) + state["pos_embed"]
    for index in range(DEPTH):
        p = {key[len(f"blocks.{index}."):]: value for key, value in state.items() if key.startswith(f"blocks.{index}.")}
        h = F.layer_norm(x, (D,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(batch, -1, 3, HEADS, D // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (D // HEADS) ** -0.5).softmax(dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(batch, -1, D)
        x = x + F.linear(h, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (D,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                         p["mlp.fc2.bias"])
    x_cls, x_patch = x[:, :C], x[:, C:]
    x_patch = x_patch.reshape(batch, GRID, GRID, D).permute(0, 3, 1, 2)
    cams = F.conv2d(x_patch, state["head.weight"], state["head.bias"], padding=1)
    return x_cls.mean(-1), cams.mean(dim=(2, 3)), cams


def test_a_reference_checkpoint_loads_strictly_and_computes_the_same(tmp_path: Path) -> None:
    state = reference_state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state}, path)  # MCTformer main.py: torch.save({'model': model.state_dict()}, ...)
    model = load_reference_mctformer(path, heads=HEADS)
    assert (model.n_classes, model.patch_size, model.train_grid, len(model.blocks)) == (C, PATCH, GRID, DEPTH)
    images = torch.randn(2, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(images)
        class_logits, patch_logits, cams = reference_forward(state, images)
    torch.testing.assert_close(ours.class_logits, class_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.patch_logits, patch_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.patch_cams, cams, atol=1e-5, rtol=1e-5)


def _v1_layout(state: dict) -> dict:  # MCTformer-V1: no PatchCAM conv, a linear head
    return {**{k: v for k, v in state.items() if not k.startswith("head.")}, "head.weight": torch.zeros(C, D),
            "head.bias": torch.zeros(C)}


def _our_own_model_file(state: dict) -> dict:  # cam_train's layout (patch_head), not the reference's
    return {"model": {("patch_head." + k[5:] if k.startswith("head.") else k): v for k, v in state.items()
                      if not k.startswith("norm.")}, "config": {}}


def _a_block_short(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}


@pytest.mark.parametrize("breaker, words", [(_v1_layout, "an MCTformer-V1 or a classifier checkpoint?"),
                                            (_our_own_model_file, "unexpected keys ['patch_head.bias'"),
                                            (_a_block_short, "missing keys ['blocks.1.mlp.fc2.bias']")])
def test_a_checkpoint_of_another_layout_is_one_line_naming_the_file(tmp_path: Path, breaker, words) -> None:
    path = tmp_path / "other.pth"
    torch.save(breaker(reference_state_dict()), path)
    with pytest.raises(ReferenceCheckpointError) as caught:
        load_reference_mctformer(path, heads=HEADS)
    message = str(caught.value)
    assert message.startswith(f"{path}: not an MCTformer-V2 checkpoint") and words in message and "\n" not in message


def test_cam_infer_runs_a_released_checkpoint_instead_of_a_trained_model(tmp_path: Path) -> None:
    """``cam.source: checkpoint``: cam_infer builds the CAM store from the released model (no cam_train model)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_voc import write_tiny_voc  # noqa: PLC0415

    from pipeline.cam_infer import CamInferPaths, infer_cams  # noqa: PLC0415
    from weakclip_core.artifacts.cam_store import CamStoreReader  # noqa: PLC0415
    from weakclip_core.config import params_from_dict  # noqa: PLC0415

    write_tiny_voc(tmp_path / "data", n_train=4, n_val=2, size=GRID * PATCH)  # 3 foreground classes = C
    torch.save({"model": reference_state_dict()}, tmp_path / "released.pth")
    params = params_from_dict({"runtime": {"device": "cpu"}, "dataset": {"prepared_dir": str(tmp_path / "data")},
                               "cam": {"source": "checkpoint", "checkpoint": str(tmp_path / "released.pth"),
                                       "arch": {"heads": HEADS, "width": D, "patch_size": PATCH},
                                       "infer": {"scales": [1.0], "attention_layers": 2}}})
    paths = CamInferPaths(model=tmp_path / "no_trained_model.pt", store=tmp_path / "train.h5",
                          metrics=tmp_path / "cam.json", curve=tmp_path / "curve.csv")
    metrics = infer_cams(params, paths, show_progress=False)
    assert metrics["n_images"] == 4 and 0.0 <= metrics["miou"] <= 1.0
    store = CamStoreReader(paths.store)
    classes, cams = store.read("train_000")
    assert cams.shape == (len(classes), GRID * PATCH, GRID * PATCH)
