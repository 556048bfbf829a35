"""MCTformer-V2 on tiny configs: shapes, finiteness, gradients, other input sizes, DeiT state-dict loading."""

from __future__ import annotations

import pytest
import timm
import torch

from weakclip_core.config import MCTformerArchConfig
from weakclip_core.models.mctformer import (MCTformerV2, PretrainedWeightsError, build_mctformer,
                                            load_deit_weights)

TINY = dict(image_size=32, patch_size=8, width=16, depth=3, heads=2, mlp_ratio=2.0)


def test_forward_shapes_attention_rows_and_finite_gradients():
    torch.manual_seed(0)
    model = MCTformerV2(n_classes=4, drop_path=0.2, **TINY).train()
    images = torch.randn(3, 3, 32, 32)
    output = model(images, return_attention=True)
    assert output.class_logits.shape == (3, 4) and output.patch_logits.shape == (3, 4)
    assert output.patch_cams.shape == (3, 4, 4, 4)
    assert len(output.attentions) == 3
    for weights in output.attentions:
        assert weights.shape == (3, 4 + 16, 4 + 16)  # averaged over the heads
        assert torch.allclose(weights.sum(-1), torch.ones(3, 20), atol=1e-5)
    torch.testing.assert_close(output.patch_logits, output.patch_cams.mean(dim=(2, 3)))
    loss = (torch.nn.functional.multilabel_soft_margin_loss(output.class_logits, torch.ones(3, 4))
            + torch.nn.functional.multilabel_soft_margin_loss(output.patch_logits, torch.zeros(3, 4)))
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert model(images).attentions is None


def test_each_layers_attention_is_the_mean_of_its_heads_softmax_maps():
    torch.manual_seed(0)
    model = MCTformerV2(n_classes=4, **TINY).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        output = model(images, return_attention=True)
        tokens = torch.cat([model.cls_token.expand(3, -1, -1), model.patch_embed(images)[0]], dim=1) + model.pos_embed
        for block, weights in zip(model.blocks, output.attentions, strict=True):
            # by hand: each head's softmax(q k^T / sqrt(d)) over the 4 + 16 tokens, then the mean over the 2 heads
            qkv = block.attn.qkv(block.norm1(tokens)).reshape(3, 20, 3, 2, 8).permute(2, 0, 3, 1, 4)
            per_head = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) / 8 ** 0.5, dim=-1)
            torch.testing.assert_close(weights, per_head.mean(dim=1))
            tokens = block(tokens, False)[0]


def test_other_input_sizes_interpolate_the_position_embedding():
    torch.manual_seed(0)
    model = MCTformerV2(n_classes=2, **TINY).eval()
    with torch.no_grad():
        output = model(torch.randn(2, 3, 48, 24), return_attention=True)
        assert output.patch_cams.shape == (2, 2, 6, 3)
        assert output.attentions[0].shape == (2, 2 + 18, 2 + 18)
        assert all(torch.isfinite(t).all() for t in (output.class_logits, output.patch_logits, output.patch_cams))
        # Resizing to the training grid is the identity: the learnt embedding comes back unchanged.
        torch.testing.assert_close(model.position_embedding(4, 4), model.pos_embed)
        resized = model.position_embedding(6, 3)
        assert resized.shape == (1, 2 + 18, 16)
        torch.testing.assert_close(resized[:, :2], model.pos_embed[:, :2])


def test_eval_is_deterministic_and_drop_path_only_acts_in_training():
    torch.manual_seed(0)
    model = MCTformerV2(n_classes=2, drop_path=0.5, **TINY)
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images).class_logits, model(images).class_logits)
        model.train()
        assert not torch.equal(model(images).class_logits, model(images).class_logits)


def tiny_deit(tmp_path, **overrides) -> tuple[timm.models.VisionTransformer, str]:
    """A timm DeiT-style ViT (one class token, LayerNorm eps 1e-6, 10-way head) saved as a DeiT checkpoint."""
    config = dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=10)
    config.update(overrides)
    deit = timm.models.VisionTransformer(**config).eval()
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": deit.state_dict()}, path)
    return deit, str(path)


def test_deit_state_dict_round_trip_reproduces_timm_tokens(tmp_path):
    torch.manual_seed(0)
    deit, path = tiny_deit(tmp_path)
    model = build_mctformer(MCTformerArchConfig(**TINY), n_classes=3)
    load_deit_weights(model, path)
    model.eval()
    for name, value in deit.state_dict().items():
        if name.startswith("blocks.") or name.startswith("patch_embed."):
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    assert torch.equal(model.cls_token, deit.cls_token.expand(1, 3, 16))
    assert torch.equal(model.pos_embed[:, :3], deit.pos_embed[:, :1].expand(1, 3, 16))
    assert torch.equal(model.pos_embed[:, 3:], deit.pos_embed[:, 1:])
    # With one class token the loaded model is that DeiT: its class logit is the mean of timm's class token
    # after the blocks (before the final norm). More tokens attend to each other, so they differ.
    single = build_mctformer(MCTformerArchConfig(**TINY), n_classes=1)
    load_deit_weights(single, path)
    single.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = deit.blocks(deit._pos_embed(deit.patch_embed(images)))
        torch.testing.assert_close(single(images).class_logits, tokens[:, :1].mean(-1), rtol=1e-5, atol=1e-6)


def test_deit_weights_load_at_another_input_size_with_a_resized_position_embedding(tmp_path):
    torch.manual_seed(0)
    _, path = tiny_deit(tmp_path)
    model = MCTformerV2(n_classes=2, **{**TINY, "image_size": 48})
    ignored = load_deit_weights(model, path)
    assert set(ignored) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert model.pos_embed.shape == (1, 2 + 36, 16)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 48, 48)).class_logits).all()


def test_mismatched_or_missing_weights_name_the_file(tmp_path):
    _, path = tiny_deit(tmp_path, embed_dim=24)
    model = build_mctformer(MCTformerArchConfig(**TINY), n_classes=2)
    with pytest.raises(PretrainedWeightsError, match="deit_tiny.pth"):
        load_deit_weights(model, path)
    shallow_dir = tmp_path / "shallow"
    shallow_dir.mkdir()
    _, shallow = tiny_deit(shallow_dir, depth=2)
    with pytest.raises(PretrainedWeightsError, match="missing .*blocks.2"):
        load_deit_weights(model, shallow)
    with pytest.raises(PretrainedWeightsError, match="nowhere.pth: pretrained weights file not found"):
        load_deit_weights(model, tmp_path / "nowhere.pth")
