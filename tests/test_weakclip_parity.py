"""Parameter parity with the paper at ViT-B/16, input 512, K = 21 (built on the meta device: no memory)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import CLIP

from weakclip_core.config.weakclip import paper_weakclip_arch
from weakclip_core.models.weakclip import WeakCLIP

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]

# docs/METHOD.md §2: the paper's breakdown (millions)
EXPECTED_PARTS = {"visual": 86.8, "text": 63.4, "adapter": 7.09, "prompts_and_temperatures": 0.00512,  # "5k" in docs/METHOD.md: 8 x 512 + 2 x 512
                  "co_attention": 6.84, "neck": 3.17, "head": 4.14}


def count(parameters) -> int:
    return sum(parameter.numel() for parameter in parameters)


@pytest.fixture(scope="module")
def paper_model() -> WeakCLIP:
    config = open_clip.get_model_config("ViT-B-16")
    config = {**config, "vision_cfg": {**config["vision_cfg"], "image_size": 512}}
    with torch.device("meta"):
        clip_model = CLIP(**config)
        model = WeakCLIP(clip_model, VOC_CLASSES, paper_weakclip_arch())
    return model


def test_part_counts_match_the_paper(paper_model: WeakCLIP) -> None:
    model = paper_model
    temperatures = [model.co_attention.text_temperature, model.co_attention.visual_temperature]
    temperature_ids = {id(p) for p in temperatures}
    parts = {
        "visual": count(model.clip.visual.parameters()),
        "text": count(model.clip.parameters()) - count(model.clip.visual.parameters()),
        "adapter": count(model.pyramid_adapter.parameters()),
        "prompts_and_temperatures": count(model.prompt_learner.parameters()) + count(temperatures),
        "co_attention": count(p for p in model.co_attention.parameters() if id(p) not in temperature_ids),
        "neck": count(model.decoder.neck.parameters()),
        "head": count(model.decoder.head.parameters()),
    }
    assert parts["prompts_and_temperatures"] == 8 * 512 + 2 * 512  # 8 contexts + α + β
    for name, expected in EXPECTED_PARTS.items():
        assert abs(parts[name] / 1e6 - expected) <= 0.02 * expected, (name, parts[name])


def test_totals_match_the_paper(paper_model: WeakCLIP) -> None:
    total = count(paper_model.parameters())
    trainable = count(paper_model.trainable_parameters())
    assert abs(total / 1e6 - 171.46) <= 0.01 * 171.46, total
    assert abs(trainable / 1e6 - 21.24) <= 0.01 * 21.24, trainable
    assert trainable == total - count(paper_model.clip.parameters())
    assert abs(trainable / total - 0.124) < 0.002  # the paper's 12.4 %


def test_head_width_is_the_semantic_fpn_heads_conv_width(paper_model: WeakCLIP) -> None:
    """``head_width`` 256 (config/paper.py) is the conv width of the semantic-FPN head, not an attention head's:
    1 + 1 + 2 + 3 conv3x3-BN blocks of 256 → 256 channels and a 1x1 classifier to K = 21, counted by hand,
    give docs/METHOD.md's 4.14M (width 128 would give 1.63M)."""
    block = 256 * 256 * 9 + 2 * 256
    assert count(paper_model.decoder.head.parameters()) == 7 * block + (256 * 21 + 21) == 4_137_749
