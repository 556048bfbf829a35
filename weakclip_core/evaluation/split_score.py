"""A dense model's argmax scored against a split's GT masks: the loop WeakCLIP's own evaluation
(``pipeline/weakclip_train.py``) and the held-out bench (``bench/heldout.py``) share, so both score the same
images (those with a GT mask) the same way (VOC convention, 255 ignored, single argmax, no CRF).

Under torchrun each rank scores every ``world_size``-th image and the ranks' confusion matrices are summed
(integer counts, an exact sum): one process's report, in 1/``world_size`` of the time (a rank's batches hold
other images than one process's, so a kernel that rounds differently at another batch size may flip a near-tie
pixel). Before, rank 0 scored the whole split alone after training (COCO: 82,081 train images) while the other
GPUs waited at a barrier."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from weakclip_core.data.layout import PreparedDataset
from weakclip_core.evaluation.metrics import ConfusionAccumulator
from weakclip_core.method.inference import DenseModel, InferenceAugmentation, predict_label_batch
from weakclip_core.runtime.distributed import DistributedContext, all_reduce_sum


def score_argmax_on_split(model: DenseModel, dataset: PreparedDataset, image_ids: Sequence[str],
                          tta: InferenceAugmentation, restrict_to_labels: bool, device: torch.device | str = "cpu",
                          batch_size: int = 16, progress: str | None = None,
                          context: DistributedContext | None = None) -> tuple[ConfusionAccumulator, int]:
    """(the confusion of ``model``'s argmax against GT over ``image_ids``' images that have a mask, how many).

    ``restrict_to_labels``: only each image's labels + background may win (the train split, where the labels
    are given); otherwise every class (held-out images). ``progress``: a tqdm bar over batches with that
    description (``None``: no bar; a rank shows its own share). ``context``: under torchrun every rank must
    call this with the same ``image_ids``; each scores its share and every rank gets the whole split's sums."""
    scored = [image_id for image_id in image_ids if dataset.has_mask(image_id)]
    share = scored if context is None else scored[context.rank::context.world_size]
    accumulator = ConfusionAccumulator(dataset.n_classes)
    for start in tqdm(range(0, len(share), batch_size), desc=progress, unit="batch", disable=progress is None):
        batch_ids = share[start:start + batch_size]
        labels = ([dataset.image_labels(image_id, allow_empty=True) for image_id in batch_ids]  # a val image with
                  if restrict_to_labels else None)  # no class (COCO's unannotated ones) may only be background
        predictions = predict_label_batch(model, [dataset.image(image_id) for image_id in batch_ids], labels,
                                          dataset.n_classes, tta, device)
        for image_id, prediction in zip(batch_ids, predictions):
            accumulator.add(dataset.checked_mask(image_id, prediction.shape), prediction)
    if context is not None and context.is_distributed:
        summed = all_reduce_sum(torch.from_numpy(accumulator.confusion).to(context.device), context)
        accumulator.confusion = summed.cpu().numpy().astype(np.int64)
    return accumulator, len(scored)
