"""Checkpoint unwrapping against hand-built checkpoints of each wrapping in the wild."""

import torch

from weakclip_core.artifacts.state_dict import unwrap_state_dict

WEIGHTS = {"blocks.0.weight": torch.ones(2), "blocks.0.bias": torch.zeros(2)}


def test_plain_state_dict_is_returned_as_is():
    assert unwrap_state_dict(WEIGHTS) is WEIGHTS


def test_wrapper_keys_and_prefixes_are_removed():
    ddp = {f"module.{key}": value for key, value in WEIGHTS.items()}
    compiled_ddp = {f"module._orig_mod.{key}": value for key, value in WEIGHTS.items()}
    for checkpoint in ({"model": WEIGHTS, "epoch": 3}, {"state_dict": ddp, "optimizer": {}},
                       {"model": {"state_dict": compiled_ddp}}, compiled_ddp):
        assert unwrap_state_dict(checkpoint) == WEIGHTS


def test_extra_prefix_only_when_every_key_has_it():
    encoder = {f"encoder.{key}": value for key, value in WEIGHTS.items()}
    assert unwrap_state_dict(encoder, extra_prefixes=("encoder.",)) == WEIGHTS
    assert unwrap_state_dict(encoder) == encoder
    mixed = {**encoder, "decoder.weight": torch.ones(1)}
    assert unwrap_state_dict(mixed, extra_prefixes=("encoder.",)) == mixed


def test_not_a_mapping_gives_none():
    assert unwrap_state_dict([torch.ones(1)]) is None
    assert unwrap_state_dict({"model": [1, 2]}) == {"model": [1, 2]}  # caller checks the values
