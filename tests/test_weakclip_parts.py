"""WeakCLIP's parts on a tiny CLIP: shapes, no NaN, prompt layout, attention, chaining, freezing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch

from weakclip_core.models.clip import build_clip
from weakclip_core.config.clip import ClipArchConfig, ClipConfig
from weakclip_core.config.schema import ConfigError
from weakclip_core.config.weakclip import WeakClipArchConfig, WeakClipConfig
from weakclip_core.models.weakclip import WeakCLIP
from weakclip_core.models.weakclip.co_attention import CoAttention, MultiHeadAttention
from weakclip_core.models.weakclip.decoder import TextGuidedDecoder
from weakclip_core.models.weakclip.matching import cosine_matching
from weakclip_core.models.weakclip.prompt_learner import PromptLearner
from weakclip_core.models.weakclip.pyramid_adapter import PyramidAdapter

TINY_ARCH = ClipArchConfig(embed_dim=32, image_size=64, patch_size=16, vision_width=32, vision_layers=4,
                           vision_head_width=16, text_width=24, text_layers=1, text_heads=2, context_length=16)
TINY_WEAKCLIP = WeakClipArchConfig(prompt_len=2, text_context_length=6, temperature_init=0.1, taps=(0, 1, 2, 3),
                                   co_attention=True, co_attention_width=16, co_attention_heads=2,
                                   co_attention_layers=2, neck_width=16, head_width=8, dropout=0.1)
CLASS_NAMES = ["background", "cat", "dog"]


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_clip(ClipConfig(source="random", arch=TINY_ARCH)).eval()


def tiny_weakclip(co_attention: bool = True, seed: int = 0) -> WeakCLIP:
    clip_model = tiny_clip(seed)
    torch.manual_seed(seed + 1)
    return WeakCLIP(clip_model, CLASS_NAMES, replace(TINY_WEAKCLIP, co_attention=co_attention))


def test_prompted_text_equals_clip_on_the_written_prompt() -> None:
    """With contexts set to the embeddings of "a photo", the prompt learner must give exactly
    open_clip's own encode_text of "a photo <name>" (causal mask: padding after EOT is inert)."""
    clip_model = tiny_clip()
    learner = PromptLearner.for_clip(clip_model, CLASS_NAMES, prompt_len=2, text_context_length=6)
    words = open_clip.tokenize(["a photo"], context_length=16)[0][1:3]
    with torch.no_grad():
        learner.contexts.copy_(clip_model.token_embedding(words))
        ours = learner(clip_model)
        reference = clip_model.encode_text(open_clip.tokenize([f"a photo {name}" for name in CLASS_NAMES],
                                                              context_length=16))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert ours.shape == (3, 32)


def test_prompt_layout_and_long_names() -> None:
    clip_model = tiny_clip()
    learner = PromptLearner.for_clip(clip_model, CLASS_NAMES, prompt_len=2, text_context_length=6)
    tokens = open_clip.tokenize(CLASS_NAMES, context_length=16)
    embeddings = learner.token_embeddings(clip_model).detach()
    assert embeddings.shape == (3, 6, 24)
    for row, name_tokens in enumerate(tokens):
        assert torch.equal(embeddings[row, 0], clip_model.token_embedding.weight[name_tokens[0]].detach())
        assert torch.equal(embeddings[row, 1:3], learner.contexts.detach())
        assert torch.equal(embeddings[row, 3], clip_model.token_embedding.weight[name_tokens[1]].detach())
    end_token = tokens.argmax(dim=1)  # the EOT id is the largest id
    assert torch.equal(learner.end_positions, end_token + 2)
    with pytest.raises(ValueError, match="needs .* tokens.*raise the text context length"):
        PromptLearner(["background", "a very long class name indeed"], 2, 6, 24)
    with pytest.raises(ValueError, match="text context length 3 leaves no room"):
        PromptLearner(["background", "cat"], 2, 3, 24)


def test_pyramid_adapter_strides() -> None:
    adapter = PyramidAdapter(32)
    taps = [torch.randn(2, 32, 4, 6) for _ in range(4)]
    shapes = [tuple(level.shape) for level in adapter(taps)]
    assert shapes == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]


def test_attention_against_numpy() -> None:
    torch.manual_seed(0)
    attention = MultiHeadAttention(8, heads=2, dropout=0.0).eval()
    queries, memory = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    with torch.no_grad():
        ours = attention(queries, memory).numpy()
    q = queries[0].numpy() @ attention.query.weight.detach().numpy().T
    k = memory[0].numpy() @ attention.key.weight.detach().numpy().T
    v = memory[0].numpy() @ attention.value.weight.detach().numpy().T
    heads = []
    for head in range(2):
        part = slice(4 * head, 4 * head + 4)
        scores = q[:, part] @ k[:, part].T / np.sqrt(4)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        heads.append(weights @ v[:, part])
    expected = np.concatenate(heads, axis=1) @ attention.out.weight.detach().numpy().T + attention.out.bias.detach().numpy()
    assert np.allclose(ours[0], expected, atol=1e-5)


def test_co_attention_chains_layers_and_scales_by_temperature() -> None:
    torch.manual_seed(0)
    module = CoAttention(joint_width=32, width=16, heads=2, layers=2, temperature_init=0.1, dropout=0.0).eval()
    text, visual = torch.randn(2, 3, 32), torch.randn(2, 17, 32)
    with torch.no_grad():
        out = module(text, visual)
        text_tokens, visual_tokens = module.text_in(text), module.visual_in(visual)
        chained_text = module.text_layers[1](module.text_layers[0](text_tokens, visual_tokens), visual_tokens)
        chained_visual = module.visual_layers[1](module.visual_layers[0](visual_tokens, text_tokens), text_tokens)
        last_only = module.text_layers[1](text_tokens, visual_tokens)  # the reference's behaviour
    torch.testing.assert_close(out.text, text + 0.1 * module.text_out(chained_text))
    torch.testing.assert_close(out.visual, visual + 0.1 * module.visual_out(chained_visual))
    assert not torch.allclose(out.text, text + 0.1 * module.text_out(last_only))
    with torch.no_grad():
        module.text_temperature.zero_()
        module.visual_temperature.zero_()
        silent = module(text, visual)
    assert torch.equal(silent.text, text) and torch.equal(silent.visual, visual)


def test_cosine_matching_against_numpy() -> None:
    text, visual = torch.randn(2, 3, 5), torch.randn(2, 5, 4, 6)
    ours = cosine_matching(text, visual).numpy()
    t, f = text.numpy(), visual.numpy()
    for b in range(2):
        for k in range(3):
            for y in range(4):
                for x in range(6):
                    a, c = t[b, k], f[b, :, y, x]
                    assert np.isclose(ours[b, k, y, x], a @ c / np.linalg.norm(a) / np.linalg.norm(c), atol=1e-5)


def test_decoder_output_stride_four() -> None:
    decoder = TextGuidedDecoder(feature_width=32, num_classes=3, neck_width=16, head_width=8, dropout=0.1)
    pyramid = [torch.randn(2, 32, 16 // 2**i, 24 // 2**i) for i in range(4)]
    logits = decoder(pyramid, torch.randn(2, 3, 4, 6))
    assert logits.shape == (2, 3, 16, 24) and torch.isfinite(logits).all()


@pytest.mark.parametrize("co_attention", [True, False])
def test_weakclip_forward_shapes_and_predict(co_attention: bool) -> None:
    model = tiny_weakclip(co_attention)
    model.eval()
    images = torch.randn(2, 3, 64, 96)
    output = model(images)
    assert output.logits.shape == (2, 3, 16, 24)
    assert output.matching.shape == (2, 3, 4, 6)
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.matching).all()
    assert output.matching.abs().max() <= 1.0 + 1e-5
    probabilities = model.predict(images)
    assert probabilities.shape == (2, 3, 64, 96)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2, 64, 96))


def test_class_names_must_start_with_background() -> None:
    with pytest.raises(ValueError, match="background"):
        WeakCLIP(tiny_clip(), ["cat", "dog"], TINY_WEAKCLIP)


def test_trainable_set_and_gradients() -> None:
    model = tiny_weakclip()
    model.train()
    assert not model.clip.training and model.decoder.training
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    prefixes = ("prompt_learner.", "pyramid_adapter.", "co_attention.", "decoder.")
    assert trainable and all(name.startswith(prefixes) for name in trainable)
    assert {name.split(".")[0] for name in trainable} == {prefix[:-1] for prefix in prefixes}
    assert {"co_attention.text_temperature", "co_attention.visual_temperature",
            "prompt_learner.contexts"} <= trainable
    expected = {name for name, _ in model.named_parameters() if not name.startswith("clip.")}
    assert trainable == expected
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for n, p in model.named_parameters() if n in expected}

    output = model(torch.randn(2, 3, 64, 64))
    (output.logits.square().mean() + output.matching.mean()).backward()
    for name, parameter in model.named_parameters():
        if name.startswith("clip."):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert model.prompt_learner.contexts.grad.abs().sum() > 0
    assert model.co_attention.text_temperature.grad.abs().sum() > 0


def test_clip_is_bit_identical_after_an_optimizer_step() -> None:
    model = tiny_weakclip()
    model.train()
    before = {name: tensor.clone() for name, tensor in model.clip.state_dict().items()}
    trainable_before = [p.detach().clone() for p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    output = model(torch.randn(2, 3, 64, 64))
    output.logits.logsumexp(dim=1).mean().backward()
    optimizer.step()
    for name, tensor in model.clip.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(trainable_before, model.trainable_parameters()))
    assert changed == len(trainable_before)


def test_trainable_state_dict_round_trip() -> None:
    source, target = tiny_weakclip(seed=0), tiny_weakclip(seed=0)
    with torch.no_grad():
        source.prompt_learner.contexts.add_(1.0)
    state = source.trainable_state_dict()
    assert not any(key.startswith("clip.") for key in state)
    target.load_trainable_state_dict(state)
    assert torch.equal(target.prompt_learner.contexts, source.prompt_learner.contexts)
    with pytest.raises(KeyError, match="missing"):
        target.load_trainable_state_dict({})


def test_weakclip_is_built_from_the_architecture_alone() -> None:
    """The model gets ``WeakClipConfig.arch()``: the widths it reads, never seeds, losses or training."""
    model = tiny_weakclip()
    assert model.arch == TINY_WEAKCLIP
    assert model.prompt_learner.contexts.shape == (2, 24)
    assert len(model.co_attention.text_layers) == 2 and model.co_attention.text_layers[0].self_attention.heads == 2
    assert model.decoder.neck.laterals[0].out_channels == 16
    assert model.decoder.head.classifier.in_channels == 8  # head_width: the semantic-FPN head's conv width
    assert model.taps == [0, 1, 2, 3]
    with pytest.raises(TypeError, match=r"architecture alone \(WeakClipConfig.arch\(\)\)"):
        WeakCLIP(tiny_clip(), CLASS_NAMES, WeakClipConfig())


def test_arch_from_the_full_config_and_back() -> None:
    defaults = WeakClipConfig()
    full = defaults.with_arch(TINY_WEAKCLIP)
    assert full.arch() == TINY_WEAKCLIP and full.taps == [0, 1, 2, 3]  # the config keeps its list type
    assert (full.seeds, full.loss, full.train) == (defaults.seeds, defaults.loss, defaults.train)
    assert full.with_arch(defaults.arch()) == defaults
    with pytest.raises(ConfigError, match="taps: expected 4 block indices"):
        replace(TINY_WEAKCLIP, taps=(0, 1, 2))
    with pytest.raises(ConfigError, match="co_attention_width: 16 is not divisible by co_attention_heads 3"):
        replace(TINY_WEAKCLIP, co_attention_heads=3)
