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


def reference_state_dict(seed: int = 0, width: int = D, depth: int = DEPTH) -> dict[str, torch.Tensor]:
    """``MCTformerV2(VisionTransformer)``'s state dict: names and shapes from its ``__init__`` and the base
    ViT's (``qkv_bias=True``, mlp_ratio 4, the base ViT's unused final ``norm``, ``head`` a 3x3 conv to C)."""
    generator = torch.Generator().manual_seed(seed)
    D = width  # noqa: N806 — the width, as the module's constant names it

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.2

    state = {"cls_token": rand(1, C, D), "pos_embed": rand(1, C + GRID * GRID, D),
             "patch_embed.proj.weight": rand(D, 3, PATCH, PATCH), "patch_embed.proj.bias": rand(D)}
    for index in range(depth):
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


def test_a_deit_width_with_another_head_count_is_refused_naming_the_key(tmp_path: Path) -> None:
    """A released checkpoint is DeiT-S (384 wide, 6 heads of 64); the head count is in no shape, so params.yaml's
    default ``cam.arch.heads: 3`` loaded it silently, with every attention map wrong. Now refused naming the key
    and the count its width has; 6 loads."""
    path = tmp_path / "deit_s_mctformer.pth"
    torch.save({"model": reference_state_dict(width=384, depth=1)}, path)
    with pytest.raises(ReferenceCheckpointError) as caught:
        load_reference_mctformer(path, heads=3)
    assert str(caught.value) == (f"cam.arch.heads: 3, but {path} is 384 wide, a DeiT size whose blocks have 6 heads "
                                 "of 64 (the released MCTformer-V2 checkpoints: DeiT-S, 6): set cam.arch.heads: 6")
    assert load_reference_mctformer(path, heads=6).blocks[0].attn.heads == 6


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


# =========================================================================== WeakCLIP (hustvl/WeakCLIP)
# A small reference WeakCLIP: its state dict is generated from ``reference_weakclip_layout`` (the reference's
# key names and shapes; the test below pins that table at the paper's size), and its eval forward is written
# out here with torch ops from the reference's definitions (weakclip/weakclip.py ``after_extract_feat`` /
# ``encode_decode``, weakclip/models.py ``CLIPVisionTransformer`` / ``CLIPTextContextEncoder`` /
# ``ContextDecoder``, mmseg's ``FPN`` and ``FPNHead``), not through our modules.

import math  # noqa: E402

from weakclip_core.config.weakclip import WeakClipArchConfig, paper_weakclip_arch  # noqa: E402
from weakclip_core.models.reference_weakclip import (ReferenceClipDims, load_reference_weakclip,  # noqa: E402
                                                        reference_weakclip_layout)

WC_NAMES = ["background", "cat", "dog"]
WC_CLIP = ReferenceClipDims(vision_width=32, vision_layers=4, patch_size=8, grid=8, embed_dim=16, text_width=24,
                            text_layers=2)
WC_VISION_HEADS, WC_TEXT_HEADS = 2, 2  # not in the shapes: given to the loader as head width 16 and 2 heads
WC_ARCH = WeakClipArchConfig(prompt_len=4, text_context_length=9, temperature_init=0.1, taps=(0, 1, 2, 3),
                             co_attention=True, co_attention_width=16, co_attention_heads=2, co_attention_layers=3,
                             neck_width=16, head_width=12, dropout=0.1)


def test_the_reference_weakclip_layout_at_the_paper_size_is_the_released_one() -> None:
    """Spot checks of the table against the reference's VOC config (ViT-B/16 at 512, K = 21), and its sizes
    against the paper's parameter count: 171.46M in all, 21.24M outside the frozen CLIP (adapter included)."""
    layout = reference_weakclip_layout(paper_weakclip_arch(), 21, ReferenceClipDims(768, 12, 16, 32, 512, 512, 12))
    expected = {"contexts": (1, 8, 512), "gamma": (512,), "beta": (512,),
                "backbone.positional_embedding": (1025, 768), "backbone.conv1.weight": (768, 3, 16, 16),
                "backbone.transformer.resblocks.11.attn.in_proj_weight": (2304, 768), "backbone.proj": (768, 512),
                "backbone.fpn1.1.weight": (768, 768, 2, 2), "backbone.fpn1.2.running_var": (768,),
                "backbone.fpn1.4.bias": (768,), "backbone.fpn3.weight": (768,), "backbone.fpn4.0.bias": (768,),
                "text_encoder.positional_embedding": (13, 512), "text_encoder.token_embedding.weight": (49408, 512),
                "text_encoder.text_projection": (512, 512),
                "context_decoder.memory_proj.2.weight": (256,), "context_decoder.text_proj.1.weight": (256, 512),
                "context_decoder.decoder.2.self_attn.q_proj.weight": (256, 256),
                "context_decoder.anti_decoder.0.cross_attn.proj.bias": (256,),
                "context_decoder.anti_decoder.2.mlp.3.weight": (256, 1024),
                "context_decoder.anti_out_proj.1.weight": (512, 256),
                "neck.lateral_convs.0.conv.weight": (256, 768 + 21, 1, 1), "neck.fpn_convs.3.conv.bias": (256,),
                "decode_head.scale_heads.0.0.conv.weight": (256, 256, 3, 3),
                "decode_head.scale_heads.3.4.bn.num_batches_tracked": (),
                "decode_head.conv_seg.weight": (21, 256, 1, 1)}
    assert {key: layout.get(key) for key in expected} == expected
    assert "context_decoder.decoder.0.self_attn.q_proj.bias" not in layout  # qkv_bias=False
    assert "decode_head.scale_heads.3.1.conv.weight" not in layout  # index 1 is an Upsample

    def count(keys):
        return sum(math.prod(layout[key]) for key in keys
                   if not key.endswith(("running_mean", "running_var", "num_batches_tracked")))

    frozen_clip = [key for key in layout if key.startswith("text_encoder.")
                   or (key.startswith("backbone.") and not key.startswith("backbone.fpn"))]
    assert count(layout) == 171_464_725 and count(set(layout) - set(frozen_clip)) == 21_240_853


def reference_weakclip_state(seed: int = 0, num_classes: int = len(WC_NAMES)) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reference_weakclip_layout(WC_ARCH, num_classes, WC_CLIP).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(*shape, generator=generator)
        elif key.endswith("weight") and len(shape) == 1:  # LayerNorm / GroupNorm / BN scales
            state[key] = 1 + 0.2 * torch.randn(*shape, generator=generator)
        else:
            state[key] = 0.2 * torch.randn(*shape, generator=generator)
    return state


def _ln(x, s, prefix, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], s[prefix + ".weight"], s[prefix + ".bias"], eps=eps)


def _clip_block(x, s, prefix, heads, mask=None):
    """CLIP's ResidualAttentionBlock (nn.MultiheadAttention written out, QuickGELU MLP), batch first."""
    batch, length, width = x.shape
    h = _ln(x, s, prefix + "ln_1")
    q, k, v = F.linear(h, s[prefix + "attn.in_proj_weight"], s[prefix + "attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    h = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + F.linear(h, s[prefix + "attn.out_proj.weight"], s[prefix + "attn.out_proj.bias"])
    h = F.linear(_ln(x, s, prefix + "ln_2"), s[prefix + "mlp.c_fc.weight"], s[prefix + "mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)
    return x + F.linear(h, s[prefix + "mlp.c_proj.weight"], s[prefix + "mlp.c_proj.bias"])


def _bn(x, s, prefix):
    return F.batch_norm(x, s[prefix + ".running_mean"], s[prefix + ".running_var"], s[prefix + ".weight"],
                        s[prefix + ".bias"], training=False, eps=1e-5)


def _gn(x, s, prefix):
    return F.group_norm(x, 1, s[prefix + ".weight"], s[prefix + ".bias"], eps=1e-5)


def _reference_backbone(s, images):
    """CLIPVisionTransformer.forward (eval: no drop path) with get_embeddings and the fpn1..fpn4 adapter."""
    x = F.conv2d(images, s["backbone.conv1.weight"], stride=WC_CLIP.patch_size)
    batch, width, grid_h, grid_w = x.shape
    x = x.reshape(batch, width, -1).permute(0, 2, 1)
    cls = s["backbone.class_embedding"]
    x = torch.cat([cls + torch.zeros(batch, 1, width), x], dim=1)
    pos = s["backbone.positional_embedding"]
    spatial = F.interpolate(pos[1:].reshape(1, WC_CLIP.grid, WC_CLIP.grid, width).permute(0, 3, 1, 2),
                            size=(grid_h, grid_w), mode="bilinear")
    x = x + torch.cat([(pos[0] + cls).reshape(1, 1, width), spatial.reshape(1, width, -1).permute(0, 2, 1)], dim=1)
    x = _ln(x, s, "backbone.ln_pre")
    features = []
    for index in range(WC_CLIP.vision_layers):
        x = _clip_block(x, s, f"backbone.transformer.resblocks.{index}.", WC_VISION_HEADS)
        if index in WC_ARCH.taps:
            features.append(x[:, 1:].permute(0, 2, 1).reshape(batch, -1, grid_h, grid_w))
    f = features
    up = lambda t, p: F.conv_transpose2d(t, s[p + ".weight"], s[p + ".bias"], stride=2)  # noqa: E731
    f[0] = up(F.gelu(_bn(up(_gn(f[0], s, "backbone.fpn1.0"), "backbone.fpn1.1"), s, "backbone.fpn1.2")),
              "backbone.fpn1.4")
    f[1] = up(_gn(f[1], s, "backbone.fpn2.0"), "backbone.fpn2.1")
    f[2] = _gn(f[2], s, "backbone.fpn3")
    f[3] = F.max_pool2d(_gn(f[3], s, "backbone.fpn4.0"), 2, 2)
    x = _ln(x, s, "backbone.ln_post") @ s["backbone.proj"]
    return f, x[:, 0], x[:, 1:].reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2)


def _reference_text(s):
    """CLIPTextContextEncoder.forward(texts, contexts), prompt_pos 'pre'; texts = tokenize(name, 5)."""
    from open_clip.tokenizer import SimpleTokenizer  # noqa: PLC0415

    tokenizer = SimpleTokenizer()
    name_length = WC_ARCH.text_context_length - WC_ARCH.prompt_len
    texts = torch.zeros(len(WC_NAMES), name_length, dtype=torch.long)
    for row, name in enumerate(WC_NAMES):
        ids = [tokenizer.encoder["<start_of_text>"], *tokenizer.encode(name), tokenizer.encoder["<end_of_text>"]]
        texts[row, :len(ids)] = torch.tensor(ids)
    x_text = s["text_encoder.token_embedding.weight"][texts]
    contexts = s["contexts"].expand(len(WC_NAMES), -1, -1)
    x = torch.cat([x_text[:, :1], contexts, x_text[:, 1:]], dim=1) + s["text_encoder.positional_embedding"]
    length = x.shape[1]
    mask = torch.full((length, length), float("-inf")).triu_(1)
    for index in range(WC_CLIP.text_layers):
        x = _clip_block(x, s, f"text_encoder.transformer.resblocks.{index}.", WC_TEXT_HEADS, mask)
    x = _ln(x, s, "text_encoder.ln_final")
    eos = texts.argmax(dim=-1) + WC_ARCH.prompt_len
    return x[torch.arange(len(WC_NAMES)), eos] @ s["text_encoder.text_projection"]


def _reference_attention(s, prefix, q, kv):
    batch, n, width = q.shape
    heads = WC_ARCH.co_attention_heads
    q = F.linear(q, s[prefix + ".q_proj.weight"]).reshape(batch, n, heads, width // heads)
    k = F.linear(kv, s[prefix + ".k_proj.weight"]).reshape(batch, kv.shape[1], heads, width // heads)
    v = F.linear(kv, s[prefix + ".v_proj.weight"]).reshape(batch, kv.shape[1], heads, width // heads)
    attention = (torch.einsum("bnkc,bmkc->bknm", q, k) * (width // heads) ** -0.5).softmax(dim=-1)
    x = torch.einsum("bknm,bmkc->bnkc", attention, v).reshape(batch, n, width)
    return F.linear(x, s[prefix + ".proj.weight"], s[prefix + ".proj.bias"])


def _reference_decoder_layer(s, prefix, x, memory):
    h = _ln(x, s, prefix + ".norm1")
    x = x + _reference_attention(s, prefix + ".self_attn", h, h)
    x = x + _reference_attention(s, prefix + ".cross_attn", _ln(x, s, prefix + ".norm2"), memory)
    h = F.gelu(F.linear(_ln(x, s, prefix + ".norm3"), s[prefix + ".mlp.0.weight"], s[prefix + ".mlp.0.bias"]))
    return x + F.linear(h, s[prefix + ".mlp.3.weight"], s[prefix + ".mlp.3.bias"])


def _reference_context_decoder(s, text, visual):
    """ContextDecoder.forward with if_decouple: every layer reads the projected inputs; the last one's output
    is kept (``for layer in self.decoder: text_diff = layer(text, visual)``)."""
    p = "context_decoder."
    visual = _ln(F.linear(_ln(visual, s, p + "memory_proj.0"), s[p + "memory_proj.1.weight"],
                          s[p + "memory_proj.1.bias"]), s, p + "memory_proj.2")
    text = F.linear(_ln(text, s, p + "text_proj.0"), s[p + "text_proj.1.weight"], s[p + "text_proj.1.bias"])
    for index in range(WC_ARCH.co_attention_layers):
        text_diff = _reference_decoder_layer(s, f"{p}decoder.{index}", text, visual)
    for index in range(WC_ARCH.co_attention_layers):
        visual_diff = _reference_decoder_layer(s, f"{p}anti_decoder.{index}", visual, text)

    def out(name, t):
        return F.linear(_ln(t, s, f"{p}{name}.0"), s[f"{p}{name}.1.weight"], s[f"{p}{name}.1.bias"])

    return out("out_proj", text_diff), out("anti_out_proj", visual_diff)


def reference_weakclip_forward(s, images):
    """WeakCLIP.encode_decode up to the decode head's output (1/4), and the score map; eval mode."""
    x_orig, global_feat, visual_embeddings = _reference_backbone(s, images)
    batch, channels, grid_h, grid_w = visual_embeddings.shape
    visual_context = torch.cat([global_feat.reshape(batch, channels, 1),
                                visual_embeddings.reshape(batch, channels, -1)], dim=2).permute(0, 2, 1)
    text_embeddings = _reference_text(s).unsqueeze(0).expand(batch, -1, -1)
    text_diff, visual_diff = _reference_context_decoder(s, text_embeddings, visual_context)
    visual_context = visual_context + s["beta"] * visual_diff
    visual_embeddings = visual_context[:, 1:, :].permute(0, 2, 1).reshape(batch, channels, grid_h, grid_w)
    text_embeddings = text_embeddings + s["gamma"] * text_diff
    score_map = torch.einsum("bchw,bkc->bkhw", F.normalize(visual_embeddings, dim=1),
                             F.normalize(text_embeddings, dim=2))
    x_orig = [torch.cat([level, F.interpolate(score_map, size=level.shape[2:], mode="bilinear", align_corners=True)],
                        dim=1) for level in x_orig]
    laterals = [F.conv2d(level, s[f"neck.lateral_convs.{i}.conv.weight"], s[f"neck.lateral_convs.{i}.conv.bias"])
                for i, level in enumerate(x_orig)]
    for i in range(3, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    outs = [F.conv2d(t, s[f"neck.fpn_convs.{i}.conv.weight"], s[f"neck.fpn_convs.{i}.conv.bias"], padding=1)
            for i, t in enumerate(laterals)]
    output = None
    for level, feature in enumerate(outs):
        for block in range(max(1, level)):
            prefix = f"decode_head.scale_heads.{level}.{2 * block if level else 0}"
            feature = F.relu(_bn(F.conv2d(feature, s[prefix + ".conv.weight"], padding=1), s, prefix + ".bn"))
            if level:
                feature = F.interpolate(feature, scale_factor=2, mode="bilinear", align_corners=False)
        output = feature if output is None else output + F.interpolate(
            feature, size=output.shape[2:], mode="bilinear", align_corners=False)
    return F.conv2d(output, s["decode_head.conv_seg.weight"], s["decode_head.conv_seg.bias"]), score_map


def _load_weakclip(path: Path, names=WC_NAMES):
    return load_reference_weakclip(path, names, WC_ARCH, vision_head_width=WC_CLIP.vision_width // WC_VISION_HEADS,
                                   text_heads=WC_TEXT_HEADS)


@pytest.mark.parametrize("size", [(64, 64), (48, 64)])  # the training grid, and one the positions are resized to
def test_a_reference_weakclip_checkpoint_loads_strictly_and_computes_the_same(tmp_path: Path, size) -> None:
    state = reference_weakclip_state()
    path = tmp_path / "iter_20000.pth"
    torch.save({"meta": {"iter": 20000, "CLASSES": list(WC_NAMES)}, "state_dict": state}, path)  # mmcv's layout
    model = _load_weakclip(path)  # strict inside: every key of ours is set
    assert model.arch.co_attention_layers == 1 and len(model.co_attention.text_layers) == 1
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(images)
        logits, score_map = reference_weakclip_forward(state, images)
        # the reference's co-attention layers before the last never reach its output: changing them changes nothing
        dead = {**state, **{k: v + 1 for k, v in state.items() if k.startswith("context_decoder.decoder.0.")}}
        torch.testing.assert_close(reference_weakclip_forward(dead, images)[0], logits)
    grid_h, grid_w = size[0] // WC_CLIP.patch_size, size[1] // WC_CLIP.patch_size
    assert ours.logits.shape == (2, len(WC_NAMES), 4 * grid_h, 4 * grid_w)  # 4x the patch grid (1/4 at patch 16)
    torch.testing.assert_close(ours.matching, score_map, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.logits, logits, atol=1e-4, rtol=1e-4)


def _wc_missing_layer_part(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "context_decoder.anti_decoder.2.mlp.3.bias"}


def _wc_with_auxiliary_head(state: dict) -> dict:
    return {**state, "auxiliary_head.conv_seg.weight": torch.zeros(3, 12, 1, 1)}


def _wc_our_own_model_file(state: dict) -> dict:  # weakclip_train's layout (trainable parts only, our names)
    return {"model": {"prompt_learner.contexts": state["contexts"][0], "co_attention.text_temperature": state["gamma"]},
            "config": {}}


@pytest.mark.parametrize("breaker, names, words", [
    (_wc_missing_layer_part, WC_NAMES, "missing keys ['context_decoder.anti_decoder.2.mlp.3.bias']"),
    (_wc_with_auxiliary_head, WC_NAMES, "unexpected keys ['auxiliary_head.conv_seg.weight']"),
    (_wc_our_own_model_file, WC_NAMES, "missing keys ['backbone.conv1.weight'"),
    (lambda state: state, WC_NAMES + ["bird"], "wrong shapes: neck.lateral_convs.0.conv.weight is (16, 35, 1, 1), "
                                               "expected (16, 36, 1, 1)")])
def test_a_weakclip_checkpoint_of_another_layout_is_one_line_naming_the_file(tmp_path: Path, breaker, names,
                                                                             words) -> None:
    path = tmp_path / "other.pth"
    torch.save({"state_dict": breaker(reference_weakclip_state())}, path)
    with pytest.raises(ReferenceCheckpointError) as caught:
        _load_weakclip(path, names)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a WeakCLIP checkpoint of this layout") and words in message
    assert "\n" not in message
