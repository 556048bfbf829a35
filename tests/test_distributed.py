"""DDP helpers: 2 Gloo processes on CPU train to the same weights as 1 process with the doubled batch."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from weakclip_core.config.params import RuntimeConfig
from pipeline._stage import stage_command
from weakclip_core.runtime.distributed import (
    DistributedContext,
    init_distributed,
    make_sampler,
    per_process_batch_size,
    run_on_main,
    shutdown_distributed,
    unwrap_model,
    wrap_model,
)

GLOBAL_BATCH = 8
STEPS = 3
LEARNING_RATE = 0.1


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(GLOBAL_BATCH * STEPS, 5, generator=generator)
    targets = torch.randn(GLOBAL_BATCH * STEPS, 2, generator=generator)
    return TensorDataset(inputs, targets)


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def _reference_weights() -> dict[str, torch.Tensor]:
    """One process, plain torch, batch = GLOBAL_BATCH samples taken in order."""
    data = _data()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for step in range(STEPS):
        inputs, targets = data[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    context = init_distributed("cpu", env=env)
    try:
        data = _data()
        sampler = make_sampler(data, context, shuffle=False, seed=0)
        loader = DataLoader(data, batch_size=per_process_batch_size(GLOBAL_BATCH, context), sampler=sampler)
        model = wrap_model(_model(), context)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        for inputs, targets in loader:
            optimizer.zero_grad()
            nn.functional.mse_loss(model(inputs), targets).backward()
            optimizer.step()
        out = Path(out_dir)
        torch.save(unwrap_model(model).state_dict(), out / f"weights_rank{rank}.pt")
        run_on_main(context, lambda: (out / "written_by.txt").write_text(str(context.rank)))
    finally:
        shutdown_distributed(context)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_double_batch(tmp_path: Path) -> None:
    """5 s idle, ~30 s on this machine under load: two spawned children each import torch."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    reference = _reference_weights()
    initial = _model().state_dict()
    for rank in (0, 1):
        weights = torch.load(tmp_path / f"weights_rank{rank}.pt")
        assert weights.keys() == reference.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=1e-5)
            assert not torch.allclose(tensor, initial[name]), f"{name} did not train"
    # Exactly one process wrote the shared file, and it was rank 0.
    assert (tmp_path / "written_by.txt").read_text() == "0"


def test_sampler_shards_are_disjoint_and_cover_the_data() -> None:
    data = _data()
    shards = [
        list(iter(make_sampler(data, DistributedContext(r, r, 3, torch.device("cpu"), "gloo"), shuffle=True, seed=5)))
        for r in range(3)
    ]
    flat = sorted(index for shard in shards for index in shard)
    assert flat == list(range(len(data)))  # 24 samples over 3 ranks: nothing dropped, nothing twice
    assert {len(shard) for shard in shards} == {8}


def test_single_process_context_without_torchrun_env() -> None:
    context = init_distributed("cpu", env={})
    assert (context.rank, context.world_size, context.backend, context.is_main) == (0, 1, None, True)
    model = nn.Linear(2, 2)
    assert wrap_model(model, context) is model


def test_the_process_group_waits_hours_for_rank_0s_evaluation_not_torchs_default() -> None:
    """After training, rank 0 alone evaluates (COCO: 82k images) while the other ranks wait in a broadcast; at
    torch's default collective timeout (NCCL: 10 minutes) they gave up mid-evaluation. The group that
    ``init_distributed`` makes (here a one-process Gloo group, as torchrun's ``nproc: 1``) waits 3 hours."""
    import datetime

    import torch.distributed as dist

    from weakclip_core.runtime.distributed import COLLECTIVE_TIMEOUT

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    context = init_distributed("cpu", env=env)
    try:
        assert context.backend == "gloo"
        waits = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
        assert waits == COLLECTIVE_TIMEOUT == datetime.timedelta(hours=3)
        assert waits > dist.distributed_c10d._get_default_timeout(dist.Backend.NCCL)  # 10 minutes
    finally:
        shutdown_distributed(context)


def test_uneven_batch_split_names_nproc() -> None:
    context = DistributedContext(0, 0, 3, torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match="runtime.nproc"):
        per_process_batch_size(8, context)


def test_stage_command_for_each_launcher() -> None:
    plain = stage_command("pipeline.cam_train", RuntimeConfig(launcher="none"), ["--params", "p.yaml"])
    assert plain == [sys.executable, "-m", "pipeline.cam_train", "--params", "p.yaml"]
    ddp = stage_command("pipeline.cam_train", RuntimeConfig(launcher="torchrun", nproc=4), ["--params", "p.yaml"])
    assert Path(ddp[0]).name == "torchrun"
    assert ddp[1:] == ["--standalone", "--nproc_per_node", "4", "-m", "pipeline.cam_train", "--params", "p.yaml"]


def test_torchrun_with_more_processes_than_visible_gpus_is_refused_before_the_launch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/voc.yaml's ``nproc: 2`` on a Prefect GPU deployment that sees one GPU used to start torchrun and
    die in rank 1's ``torch.cuda.set_device`` (invalid device ordinal), retried to no end. This machine has no
    GPU: CUDA is made to report 1 and then 2 devices."""
    from weakclip_core.config.schema import ConfigError
    from pipeline._stage import check_gpus_for_torchrun

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError) as refused:
        check_gpus_for_torchrun(RuntimeConfig(launcher="torchrun", nproc=2))
    assert str(refused.value) == ("runtime.nproc: 2 processes under runtime.launcher: torchrun take one GPU each, and 1 "
                                  "is visible here (CUDA_VISIBLE_DEVICES=3); lower runtime.nproc, or give the stage "
                                  "more GPUs (Prefect pools: python -m flows.deploy --gpus <N> --gpus-per-stage 2)")
    check_gpus_for_torchrun(RuntimeConfig(launcher="torchrun", nproc=1))
    check_gpus_for_torchrun(RuntimeConfig(launcher="torchrun", nproc=2, device="cpu"))  # Gloo processes: no GPU
    check_gpus_for_torchrun(RuntimeConfig(launcher="none", nproc=2))  # nproc unused
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_gpus_for_torchrun(RuntimeConfig(launcher="torchrun", nproc=2))


TINY_STAGE = '''
import sys
from pathlib import Path

import torch

from weakclip_core.config.params import RuntimeConfig
from pipeline._stage import relaunch_under_torchrun
from weakclip_core.runtime.distributed import all_reduce_mean, init_distributed, run_on_main, shutdown_distributed


def main() -> None:
    code = relaunch_under_torchrun("tiny_ddp_stage", RuntimeConfig(launcher="torchrun", nproc=2), sys.argv[1:])
    if code is not None:
        raise SystemExit(code)
    context = init_distributed("cpu")
    mean_rank = all_reduce_mean(torch.tensor(float(context.rank)), context)
    out = Path(sys.argv[1])
    run_on_main(context, lambda: (out / "result.txt").write_text(f"{context.world_size} {context.backend} {mean_rank.item()}"))
    shutdown_distributed(context)


if __name__ == "__main__":
    main()
'''


@pytest.mark.slow
def test_stage_relaunches_itself_under_torchrun(tmp_path: Path) -> None:
    """``python -m stage`` with ``launcher: torchrun`` becomes 2 torchrun workers that join one Gloo group."""
    import os
    import subprocess

    (tmp_path / "tiny_ddp_stage.py").write_text(TINY_STAGE)
    repo_root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(repo_root)]), OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "tiny_ddp_stage", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # World of 2 on Gloo; the mean of ranks 0 and 1 is 0.5; only rank 0 wrote.
    assert (tmp_path / "result.txt").read_text() == "2 gloo 0.5"


def _gloo_rank(rank: int, world_size: int, port: int) -> DistributedContext:
    """This spawned process as rank ``rank`` of a CPU Gloo group, one thread (as torchrun would set it up)."""
    torch.set_num_threads(1)
    return init_distributed("cpu", env={"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def _scoring_worker(rank: int, world_size: int, port: int, dataset_root: str, out_dir: str) -> None:
    """One rank of the sharded closing score: an always-'cat' model that counts the images it is given."""
    import json

    from tiny_voc import CLASS_NAMES
    from weakclip_core.data.layout import PreparedDataset
    from weakclip_core.evaluation.split_score import score_argmax_on_split
    from weakclip_core.method.inference import InferenceAugmentation

    context = _gloo_rank(rank, world_size, port)
    try:
        dataset = PreparedDataset.open(dataset_root)
        cat = CLASS_NAMES.index("cat")
        seen = [0]

        def always_cat(images: torch.Tensor) -> torch.Tensor:
            seen[0] += images.shape[0]
            logits = torch.zeros(images.shape[0], len(CLASS_NAMES), images.shape[2] // 4, images.shape[3] // 4)
            logits[:, cat] = 1.0
            return logits

        tta = InferenceAugmentation(scales=(1.0,), flip=False, crop=512, stride=341, img_scale=None)
        accumulator, n_scored = score_argmax_on_split(always_cat, dataset, dataset.split("val"), tta,
                                                      restrict_to_labels=False, batch_size=2, context=context)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
            {"confusion": accumulator.confusion.tolist(), "n_scored": n_scored, "images_seen": seen[0]}))
    finally:
        shutdown_distributed(context)


@pytest.mark.slow
def test_the_closing_score_is_sharded_over_ranks_and_summed_exactly(tmp_path: Path) -> None:
    """``weakclip_train``'s closing score under torchrun (COCO: 82,081 train images): each of 2 Gloo ranks scores
    half of the split and both get the whole split's confusion, the one worked out by hand (an always-'cat'
    model: every labelled GT pixel of class c counts at [c, cat]); used to be rank 0 alone, the others idle."""
    import json

    import numpy as np

    from tiny_voc import CLASS_NAMES, write_tiny_voc
    from weakclip_core.data.layout import PreparedDataset

    write_tiny_voc(tmp_path / "tiny", n_train=2, n_val=9)
    dataset = PreparedDataset.open(tmp_path / "tiny")
    val = dataset.split("val")
    for image_id in val[7:]:  # two val images without a mask: not scored, by any rank
        (dataset.root / "SegmentationClass" / f"{image_id}.png").unlink()
    expected = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=np.int64)
    for image_id in val[:7]:
        mask = dataset.mask(image_id)
        expected[:, CLASS_NAMES.index("cat")] += np.bincount(mask[mask != 255], minlength=len(CLASS_NAMES))

    mp.spawn(_scoring_worker, args=(2, _free_port(), str(tmp_path / "tiny"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in ranks:
        np.testing.assert_array_equal(np.array(result["confusion"]), expected)
        assert result["n_scored"] == 7
    assert [result["images_seen"] for result in ranks] == [4, 3]  # images 0, 2, 4, 6 and 1, 3, 5: one window each


class _ImageScoredModel(nn.Module):
    """A stand-in MCTformer whose logits are fixed functions of each image's pixels (class c: the mean of
    channel c mod 3, shifted by c / 10), counting the images it is shown."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.seen = 0

    def forward(self, images: torch.Tensor):  # noqa: ANN201 — a namespace like MCTformerV2's output
        from types import SimpleNamespace

        self.seen += images.shape[0]
        channel_means = images.mean(dim=(2, 3))
        logits = torch.stack([channel_means[:, c % 3] + c / 10 for c in range(self.n_classes)], dim=1)
        return SimpleNamespace(class_logits=logits, patch_logits=-logits)


def _val_map_worker(rank: int, world_size: int, port: int, dataset_root: str, out_dir: str) -> None:
    """One rank of cam_train's per-epoch val mAP: scores its share, gets the whole split's mAP."""
    import json

    from pipeline.cam_train import evaluate_map, val_shard
    from weakclip_core.data.classification import ClassificationDataset
    from weakclip_core.data.layout import PreparedDataset

    context = _gloo_rank(rank, world_size, port)
    try:
        dataset = PreparedDataset.open(dataset_root)
        val_set = ClassificationDataset(dataset, "val", 32, allow_unlabelled=True)
        model = _ImageScoredModel(dataset.n_classes - 1)
        maps = evaluate_map(model, DataLoader(val_shard(val_set, context), batch_size=2), context.device, context)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"maps": maps, "seen": model.seen}))
    finally:
        shutdown_distributed(context)


@pytest.mark.slow
def test_cam_train_val_map_is_shared_over_ranks_and_is_the_whole_splits(tmp_path: Path) -> None:
    """cam_train's per-epoch val mAP under torchrun (COCO: 40,504 val images every epoch): each of 2 Gloo ranks
    scores its contiguous share (5 + 4 of 9) and both get the mAP one process computes over the whole split,
    against an AP worked out here (mean precision at each positive's rank); used to be rank 0 alone."""
    import json

    import numpy as np

    from pipeline.cam_train import evaluate_map
    from tiny_voc import write_tiny_voc
    from weakclip_core.data.classification import ClassificationDataset
    from weakclip_core.data.layout import PreparedDataset

    write_tiny_voc(tmp_path / "tiny", n_train=2, n_val=9)
    dataset = PreparedDataset.open(tmp_path / "tiny")
    val_set = ClassificationDataset(dataset, "val", 32, allow_unlabelled=True)
    model = _ImageScoredModel(dataset.n_classes - 1)
    single = evaluate_map(model, DataLoader(val_set, batch_size=2), torch.device("cpu"))
    scores = np.concatenate([model(images).class_logits.numpy() for images, _ in DataLoader(val_set, batch_size=9)])
    targets = np.concatenate([labels.numpy() for _, labels in DataLoader(val_set, batch_size=9)])

    def hand_ap(score: np.ndarray, positive: np.ndarray) -> float:
        order = np.argsort(-score, kind="stable")
        hits = positive[order] > 0
        return float(np.mean([hits[:rank + 1].mean() for rank in np.flatnonzero(hits)]))

    expected = np.mean([hand_ap(scores[:, c], targets[:, c]) for c in range(scores.shape[1]) if targets[:, c].any()])
    assert single[0] == pytest.approx(expected, abs=1e-12)

    mp.spawn(_val_map_worker, args=(2, _free_port(), str(tmp_path / "tiny"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in ranks:
        assert result["maps"] == pytest.approx(list(single), abs=1e-6)
    assert [result["seen"] for result in ranks] == [5, 4]
