"""bench/step_profile.py: the part-by-part step is WeakCLIP's own step, its parts add up, the limit's formula."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.measure import forward_with_clip_gradients, training_batch
from bench.step_profile import (COMPULSORY, PARTS, PER_TENSOR_ADAMW, STAGE_ADAMW, PartClock, build_step,
                                ideal_frozen_step, median_step, profile_training_step, profiled_step,
                                quick_profile_size, ratio_limit, ratio_summary, synthetic_profile_size)
from weakclip_core.config.params import load_params
from weakclip_core.method.crf import CrfPool
from weakclip_core.method.losses import weakclip_losses

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def quick_size_with(aux_form: str):  # noqa: ANN201 — a ProfileSize
    """The quick size with its auxiliary loss in ``aux_form`` (the presets' ``reference`` form, or the default's)."""
    size = quick_profile_size()
    return replace(size, bench=replace(size.bench, weakclip_loss=replace(size.bench.weakclip_loss, aux_form=aux_form)))


def reference_step(full_finetune: bool, aux_form: str = "matching_size") -> tuple[list[float], dict[str, torch.Tensor],
                                                                                 dict[str, torch.Tensor]]:
    """WeakCLIP's forward (or the fine-tuning baseline's), ``weakclip_losses`` and the loop's step, written
    without the profile: the losses, the gradients and the weights after the step."""
    size = quick_size_with(aux_form)
    model, optimizer = build_step(size, CPU, full_finetune)
    batch = training_batch(size.bench, CPU)
    torch.manual_seed(7)
    with CrfPool(size.bench.weakclip_loss.crf, workers=0) as pool:
        output = forward_with_clip_gradients(model, batch["image"]) if full_finetune else model(batch["image"])
        losses = weakclip_losses(output.logits, output.matching, batch["seed_mask"], batch["raw_image"],
                                 size.bench.weakclip_loss, pool)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                 if parameter.grad is not None}
    optimizer.step()
    values = [float(value.detach()) for value in (losses.total, losses.seed, losses.boundary, losses.aux)]
    return values, gradients, {name: tensor.clone() for name, tensor in model.state_dict().items()}


def profile_step(full_finetune: bool, aux_form: str = "matching_size") -> tuple[
        list[float], dict[str, torch.Tensor], dict[str, torch.Tensor], PartClock]:
    size = quick_size_with(aux_form)
    model, optimizer = build_step(size, CPU, full_finetune)
    batch = training_batch(size.bench, CPU)
    clock = PartClock(CPU)
    gradients: dict[str, torch.Tensor] = {}
    hooks = [parameter.register_post_accumulate_grad_hook(
        lambda parameter, name=name: gradients.__setitem__(name, parameter.grad.clone()))
        for name, parameter in model.named_parameters() if parameter.requires_grad]
    torch.manual_seed(7)
    with CrfPool(size.bench.weakclip_loss.crf, workers=0) as pool:
        losses = profiled_step(model, optimizer, batch, size.bench, pool, full_finetune, clock)
    for hook in hooks:
        hook.remove()
    values = [float(value.detach()) for value in (losses.total, losses.seed, losses.boundary, losses.aux)]
    return values, gradients, {name: tensor.clone() for name, tensor in model.state_dict().items()}, clock


@pytest.mark.parametrize("aux_form", ["matching_size", "reference"])
@pytest.mark.parametrize("full_finetune", [False, True], ids=["frozen", "full"])
def test_profiled_step_is_weakclips_step(full_finetune: bool, aux_form: str) -> None:
    """Same losses, gradients and updated weights as the model's forward + ``weakclip_losses`` + AdamW, in either
    form of the auxiliary loss (the paper size's profile uses the presets' ``reference`` form)."""
    expected_losses, expected_gradients, expected_weights = reference_step(full_finetune, aux_form)
    losses, gradients, weights, clock = profile_step(full_finetune, aux_form)
    assert losses == pytest.approx(expected_losses, rel=1e-6, abs=1e-7)
    assert set(gradients) == set(expected_gradients)
    assert any(name.startswith("clip.visual.") for name in gradients) == full_finetune
    for name, gradient in expected_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-5, atol=1e-7, msg=name)
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    # Every part ran (the quick size's loss has the CRF boundary term on).
    assert all(clock.seconds[part] > 0 for part in PARTS), clock.seconds


def test_parts_add_up_to_the_step() -> None:
    record = profile_training_step(quick_profile_size(), CPU, full_finetune=False)
    parts = record["parts_s"]
    assert set(parts) == {*PARTS, "other"}
    assert sum(parts.values()) == pytest.approx(record["step_s"], rel=1e-9)
    # "other" is the step's wall time outside every part: never negative (how small it is depends on the machine's
    # load, which a test must not assert: the benchmark reports it).
    assert parts["other"] >= 0, parts
    # The parts of one real step, not medians of each part taken over different steps.
    assert min(abs(seconds - record["step_s"]) for seconds in record["step_seconds"]) < 1e-3
    assert sum(record["cpu_parts_s"].values()) == pytest.approx(record["cpu_step_s"], rel=1e-9)
    assert all(math.isfinite(loss) for loss in record["losses"])


def test_median_step_takes_one_steps_parts() -> None:
    steps = [{"backward": 3.0, "optimizer": 1.0}, {"backward": 1.0, "optimizer": 0.5}, {"backward": 2.0,
                                                                                      "optimizer": 0.5}]
    parts, total = median_step(steps, [5.0, 2.0, 3.0])
    assert total == 3.0 and parts == {"backward": 2.0, "optimizer": 0.5, "other": 0.5}
    parts, total = median_step(steps[:2], [5.0, 2.0])  # an even count: the lower middle
    assert total == 2.0 and parts["other"] == pytest.approx(0.5)


def test_limit_from_hand_given_parts() -> None:
    frozen_parts = {"clip_forward": 2.0, "text_forward": 0.25, "heads_forward": 1.0, "crf_target": 1.0,
                    "losses": 0.5, "backward": 3.0, "optimizer": 0.75, "other": 0.5}
    frozen = {"step_s": 9.0, "parts_s": frozen_parts, "cpu_step_s": 9.0, "cpu_parts_s": frozen_parts}
    full = {"step_s": 21.0, "parts_s": {}, "cpu_step_s": 21.0, "cpu_parts_s": {}}
    assert set(COMPULSORY) == {"clip_forward", "text_forward", "heads_forward", "backward", "optimizer"}
    assert ideal_frozen_step(frozen_parts) == 7.0  # 9 s less the CRF target, the losses and "other"
    assert ratio_limit(frozen_parts, 21.0) == 3.0
    summary = ratio_summary(frozen, full)
    assert summary["measured_ratio"] == pytest.approx(21 / 9)
    assert summary["limit"] == 3.0
    assert summary["fraction_of_limit"] == pytest.approx(7 / 9)  # = ideal frozen step / frozen step
    with pytest.raises(ValueError, match="ideal frozen step"):
        ratio_limit(dict.fromkeys(frozen_parts, 0.0), 21.0)


def test_synthetic_size_is_params_yaml() -> None:
    params = load_params(REPO / "params.yaml")
    size = synthetic_profile_size(params)
    bench = size.bench
    assert bench.input_size == params.weakclip.train.crop and bench.batch_size == params.weakclip.train.batch_size
    assert bench.n_classes == params.dataset.synthetic.n_classes + 1
    assert bench.weakclip == params.weakclip.arch() and bench.weakclip_loss == params.weakclip.loss
    assert bench.clip_config["vision_cfg"]["width"] == params.clip.arch.vision_width
    assert size.clip_drop_path_rate == params.weakclip.train.clip_drop_path_rate


def test_fused_adamw_takes_the_per_tensor_loops_steps() -> None:
    """The cut (weakclip_train's fused AdamW) changes the synthetic-size training by float rounding only: a few
    steps give the per-tensor loop's losses, and the trained model's outputs agree."""
    size = synthetic_profile_size(load_params(REPO / "params.yaml"))
    size = replace(size, bench=replace(size.bench, batch_size=2))
    results = {}
    for name, options in (("loop", PER_TENSOR_ADAMW), ("fused", STAGE_ADAMW)):
        model, optimizer = build_step(size, CPU, False, options)
        batch = training_batch(size.bench, CPU)
        torch.manual_seed(3)
        with CrfPool(size.bench.weakclip_loss.crf, workers=0) as pool:
            steps = [profiled_step(model, optimizer, batch, size.bench, pool, False, PartClock(CPU)) for _ in range(2)]
        losses = [float(step.total.detach()) for step in steps]
        with torch.no_grad():
            logits = model.eval()(batch["image"]).logits
        results[name] = losses, logits
    assert results["fused"][0] == pytest.approx(results["loop"][0], rel=1e-6)
    assert results["fused"][0][-1] != results["fused"][0][0]  # the steps did train
    torch.testing.assert_close(results["fused"][1], results["loop"][1], rtol=1e-5, atol=1e-5)


def test_the_page_tables_render_from_a_profile_record() -> None:
    from bench.run import step_profile_fields

    parts = {"clip_forward": 2.0, "text_forward": 0.25, "heads_forward": 1.0, "crf_target": 1.0, "losses": 0.5,
             "backward": 3.0, "optimizer": 0.75, "other": 0.5}
    runs = {f"{mode}_{precision}": {"step_s": step, "parts_s": parts, "cpu_step_s": step, "cpu_parts_s": parts}
            for mode, step in (("frozen", 9.0), ("full", 21.0)) for precision in ("fp32", "bf16")}
    ratios = {"fp32": ratio_summary(runs["frozen_fp32"], runs["full_fp32"]),
              "fp32_cpu": ratio_summary(runs["frozen_fp32"], runs["full_fp32"], "cpu_")}
    cut = {"frozen": {"per_tensor": {"s": 0.3, "cpu_s": 0.3}, "fused": {"s": 0.1, "cpu_s": 0.1}}}
    profile = {"sizes": {"paper": {"label": "paper", "runs": runs, "ratios": ratios, "optimizer_cut": cut}},
               "environment": {"device": "cpu", "threads": 1}, "created": "now",
               "load_average": {"before": 1.0, "after": 2.0}}
    fields = step_profile_fields(profile)
    assert "| paper | frozen | fp32 | 9.000 | 2.000 | 0.250 | 1.000 | 1.000 | 0.500 | 3.000 | 0.750 | 0.500 |" \
        in fields["step_profile_table"]
    assert "| paper | fp32 | wall | 9.000 | 7.000 | 21.000 | 2.33 | 3.00 | 0.778 |" in fields["step_limit_table"]
    assert "| paper | fp32 | CPU |" in fields["step_limit_table"]
    assert "| 0.300 | 0.100 | 3.00x |" in fields["step_optimizer_table"]
    assert "| paper | frozen | 9.000 | 9.000 | 1.00x |" in fields["step_precision_table"]
    assert "torch threads: 1" in fields["step_profile_setup"]
    missing = step_profile_fields(None)
    assert all("Not in this results file" in text for key, text in missing.items() if key != "step_profile_setup")
