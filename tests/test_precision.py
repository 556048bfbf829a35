"""``runtime.precision``: validated, fp32 adds no autocast at all, bf16 engages autocast in the training loop and
WeakCLIP's inference, and a few bf16 training steps of the synthetic-size model track fp32's losses."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.measure import training_batch
from bench.step_profile import build_step, quick_profile_size, synthetic_profile_size
from pipeline.weakclip_train import precise_logits
from weakclip_core.config.params import RuntimeConfig, load_params, params_from_dict
from weakclip_core.config.schema import ConfigError
from weakclip_core.method.crf import CrfPool
from weakclip_core.method.losses import weakclip_losses
from weakclip_core.models.clip import dense_visual_features
from weakclip_core.runtime.device import autocast
from weakclip_core.runtime.distributed import single_process_context
from weakclip_core.training.checkpoint import Checkpointer
from weakclip_core.training.loop import LoopPlan, run_training_loop

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
STEPS = 2


def test_precision_key_is_validated() -> None:
    assert RuntimeConfig().precision == "fp32"
    assert load_params(REPO / "params.yaml").runtime.precision == "fp32"
    assert params_from_dict({"runtime": {"precision": "bf16"}}).runtime.precision == "bf16"
    with pytest.raises(ConfigError, match=r"runtime\.precision.*fp16"):
        params_from_dict({"runtime": {"precision": "fp16"}})


def test_fp32_is_no_autocast_and_bf16_is_autocast() -> None:
    assert isinstance(autocast(CPU, "fp32"), contextlib.nullcontext)
    left, right = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(CPU, "fp32"):
        assert (left @ right).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with autocast(CPU, "bf16"):
        assert (left @ right).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"runtime\.precision"):
        autocast(CPU, "fp16")


def train_a_few_steps(precision: str, tmp_path: Path) -> tuple[list[float], set[torch.dtype]]:
    """``STEPS`` steps of the synthetic-size WeakCLIP (params.yaml's model and loss, batch 2) through the
    training loop; the losses and the dtypes the decoder's and co-attention's layers computed in."""
    size = synthetic_profile_size(load_params(REPO / "params.yaml"))
    size = replace(size, bench=replace(size.bench, batch_size=2))
    model, optimizer = build_step(size, CPU, full_finetune=False)
    batch = training_batch(size.bench, CPU)
    dtypes: set[torch.dtype] = set()
    layers = [model.decoder.head.classifier, next(module for module in model.co_attention.modules()
                                                  if isinstance(module, nn.Linear))]
    hooks = [layer.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype)) for layer in layers]
    losses: list[float] = []
    torch.manual_seed(3)
    with CrfPool(size.bench.weakclip_loss.crf, workers=0) as pool:

        def compute_losses(step: int, _: object) -> dict[str, torch.Tensor]:
            output = model(batch["image"])
            parts = weakclip_losses(output.logits, output.matching, batch["seed_mask"], batch["raw_image"],
                                    size.bench.weakclip_loss, pool)
            losses.append(float(parts.total.detach()))
            return {"loss": parts.total}

        run_training_loop(
            name="precision", lr_key="weakclip.train.lr",
            plan=LoopPlan(total_steps=STEPS, window_steps=STEPS, checkpoint_every=10 * STEPS, lr_at=lambda step: 1e-3,
                          checkpoint_at_window_end=False, checkpoint_final=False),
            batches=range(STEPS), start_step=0, model=model, optimizer=optimizer, compute_losses=compute_losses,
            context=single_process_context(CPU), checkpointer=Checkpointer("precision", {}, root=tmp_path),
            show_progress=False, precision=precision)
    for hook in hooks:
        hook.remove()
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())  # weights stay fp32
    return losses, dtypes


def test_bf16_on_a_gpu_that_only_emulates_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's ``is_bf16_supported()`` says yes on a V100 or T4 (compute capability < 8) by default, where bf16
    only runs emulated: the refusal never fired there. A fake T4's answer, as torch gives it: True with
    emulation, False without."""
    from weakclip_core.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(InputError, match="runtime.precision: bf16 needs a GPU with bfloat16 support, and Tesla T4 "
                                         "has none; use fp32"):
        autocast(torch.device("cuda"), "bf16")


def test_bf16_training_engages_autocast_and_tracks_fp32(tmp_path: Path) -> None:
    fp32_losses, fp32_dtypes = train_a_few_steps("fp32", tmp_path / "fp32")
    bf16_losses, bf16_dtypes = train_a_few_steps("bf16", tmp_path / "bf16")
    assert fp32_dtypes == {torch.float32}
    assert bf16_dtypes == {torch.bfloat16}
    assert len(bf16_losses) == STEPS and fp32_losses[-1] < fp32_losses[0]
    # bf16 keeps 8 bits of mantissa: the losses agree to about a percent, not to float noise.
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.03)


def test_inference_logits_are_float32_at_either_precision() -> None:
    size = synthetic_profile_size(load_params(REPO / "params.yaml"))
    model, _ = build_step(replace(size, clip_drop_path_rate=0.0), CPU, full_finetune=False)
    model.eval()
    images = training_batch(replace(size.bench, batch_size=2), CPU)["image"]
    with torch.no_grad():
        plain = model(images).logits
        fp32 = precise_logits(model, images, CPU, "fp32")
        bf16 = precise_logits(model, images, CPU, "bf16")
    assert torch.equal(fp32, plain)  # fp32: the plain call, bit for bit
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, plain)  # autocast did run
    torch.testing.assert_close(bf16, plain, rtol=0.05, atol=0.05 * plain.abs().max().item())


def test_clip_blocks_take_tokens_in_their_weights_dtype_under_bf16() -> None:
    """Under bf16 autocast the patch convolution returns bf16, but the blocks get float32 tokens: with bf16 ones
    nn.MultiheadAttention leaves its fused path for a fallback ~100x slower on CPU (docs/BENCHMARKS.md)."""
    size = quick_profile_size()
    model, _ = build_step(size, CPU, full_finetune=False)
    images = training_batch(replace(size.bench, batch_size=2), CPU)["image"]
    seen: list[torch.dtype] = []
    hook = model.clip.visual.transformer.resblocks[0].register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].dtype))
    with torch.no_grad():
        fp32 = dense_visual_features(model.clip.visual, images, model.taps)
        with autocast(CPU, "bf16"):
            assert model.clip.visual.conv1(images).dtype == torch.bfloat16
            bf16 = dense_visual_features(model.clip.visual, images, model.taps)
    hook.remove()
    assert seen == [torch.float32, torch.float32]
    scale = fp32.patch_embeddings.abs().max().item()
    torch.testing.assert_close(bf16.patch_embeddings.float(), fp32.patch_embeddings, rtol=0.05, atol=0.05 * scale)
