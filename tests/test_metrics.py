"""mIoU from a confusion matrix, checked against hand-worked examples."""

import numpy as np
import pytest

from weakclip_core.evaluation.metrics import ConfusionAccumulator, confusion_matrix, image_miou, iou_report


def test_hand_worked_three_classes_with_ignore():
    ground_truth = np.array([[0, 0, 1, 1],
                             [0, 2, 2, 255]])
    prediction = np.array([[0, 1, 1, 1],
                           [0, 2, 0, 2]])
    confusion = confusion_matrix(ground_truth, prediction, 3)
    # rows GT, cols prediction; the 255 pixel is skipped whatever was predicted there
    expected = np.array([[2, 1, 0],
                         [0, 2, 0],
                         [1, 0, 1]])
    np.testing.assert_array_equal(confusion, expected)
    report = iou_report(confusion)
    # class 0: TP 2, FP 1 (gt2->0), FN 1 (gt0->1): 2/4; class 1: TP 2, FP 1, FN 0: 2/3; class 2: TP 1, FN 1: 1/2
    assert report.per_class == pytest.approx([0.5, 2 / 3, 0.5])
    assert report.miou == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert report.pixel_accuracy == pytest.approx(5 / 7)
    assert report.precision == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert report.recall == pytest.approx([2 / 3, 1.0, 0.5])


def test_class_absent_from_gt_and_prediction_is_left_out():
    ground_truth = np.array([0, 0, 1, 1])
    prediction = np.array([0, 0, 1, 0])
    report = iou_report(confusion_matrix(ground_truth, prediction, 4))
    assert report.per_class[2] is None and report.per_class[3] is None
    assert report.miou == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_class_predicted_but_absent_from_gt_counts_as_zero():
    report = iou_report(confusion_matrix(np.array([0, 0]), np.array([0, 1]), 2))
    assert report.per_class == pytest.approx([0.5, 0.0])
    assert report.miou == pytest.approx(0.25)


def test_accumulator_equals_one_matrix_over_all_pixels():
    rng = np.random.default_rng(0)
    accumulator = ConfusionAccumulator(5)
    all_gt, all_pred = [], []
    for _ in range(4):
        gt = rng.integers(0, 5, size=(7, 9))
        gt[rng.random((7, 9)) < 0.1] = 255
        pred = rng.integers(0, 5, size=(7, 9))
        accumulator.add(gt, pred)
        all_gt.append(gt.ravel())
        all_pred.append(pred.ravel())
    whole = confusion_matrix(np.concatenate(all_gt), np.concatenate(all_pred), 5)
    np.testing.assert_array_equal(accumulator.confusion, whole)


def test_out_of_range_ids_and_shape_mismatch_are_errors():
    with pytest.raises(ValueError, match="class id 7"):
        confusion_matrix(np.array([0, 7]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="prediction holds class id 3"):
        confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)


def test_one_images_miou_hand_worked_and_none_when_every_pixel_is_ignore():
    # GT 0 0 0 0 1 1 / prediction 0 0 0 1 1 1: IoU_0 = 3 / (3 + 1) = 0.75, IoU_1 = 2 / (2 + 1); class 2 absent
    # from both is left out of the mean.
    ground_truth = np.array([[0, 0, 0, 0, 1, 1]], dtype=np.uint8)
    prediction = np.array([[0, 0, 0, 1, 1, 1]], dtype=np.uint8)
    assert image_miou(confusion_matrix(ground_truth, prediction, 3)) == pytest.approx((0.75 + 2 / 3) / 2)
    # A mask of ignore only scores no pixel: no mIoU at all, not 0.0 (which would rank the image worst).
    all_ignore = np.full((2, 3), 255, dtype=np.uint8)
    assert image_miou(confusion_matrix(all_ignore, np.zeros((2, 3), dtype=np.uint8), 3)) is None
    # One GT class predicted right everywhere is a perfect image, whatever the other classes.
    assert image_miou(confusion_matrix(np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8), 3)) == 1.0


def test_average_precision_hand_worked():
    from weakclip_core.evaluation.metrics import average_precision
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # positives at ranks 1, 3 and 4: precisions 1/1, 2/3, 3/4
    assert average_precision(scores, np.array([1, 0, 1, 1, 0])) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # two equal scores are one threshold: the positive gets the precision of both, 1/2, in either order
    assert average_precision(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert average_precision(scores, np.zeros(5)) is None


def test_average_precision_of_tied_scores_is_sklearns_and_does_not_depend_on_the_order():
    """Items of equal score form one threshold (scikit-learn's average_precision_score, which MCTformer's
    evaluation calls): sum over thresholds of (recall gain) x (precision). A float32 sigmoid ties at exactly 1.0
    for every logit above ~17, so a confident classifier's val mAP used to depend on the order of the val list."""
    import itertools

    from weakclip_core.evaluation.metrics import average_precision
    # three items tie at 0.9, one of them positive: precision 1/3 there; then the 0.1 positive: 2/4
    scores, positives = np.array([0.9, 0.9, 0.9, 0.1]), np.array([0, 0, 1, 1])
    for order in itertools.permutations(range(4)):
        assert average_precision(scores[list(order)], positives[list(order)]) == pytest.approx((1 / 3 + 2 / 4) / 2)

    def thresholds_reference(values: np.ndarray, labels: np.ndarray) -> float:
        total, recall_before = 0.0, 0.0
        for threshold in np.unique(values)[::-1]:
            chosen = values >= threshold
            true_positives = labels[chosen].sum()
            recall = true_positives / labels.sum()
            total += (recall - recall_before) * true_positives / chosen.sum()
            recall_before = recall
        return total

    rng = np.random.default_rng(0)
    for _ in range(200):
        size = int(rng.integers(1, 25))
        values, labels = rng.integers(0, 4, size) / 3.0, (rng.random(size) < 0.4).astype(int)
        if labels.any():
            assert average_precision(values, labels) == pytest.approx(thresholds_reference(values, labels), abs=1e-12)


def test_mean_average_precision_hand_worked():
    from weakclip_core.evaluation.metrics import mean_average_precision
    # class 0: targets 1 0 1 0 by falling score -> precisions 1/1, 2/3 -> AP 5/6
    # class 1: its one positive ranked last of 4 -> AP 1/4; class 2 has no positive: left out of the mean
    scores = np.array([[0.9, 0.9, 0.1], [0.8, 0.8, 0.2], [0.7, 0.7, 0.3], [0.6, 0.1, 0.4]])
    targets = np.array([[1.0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1 / 4) / 2)
    assert mean_average_precision(scores, np.zeros_like(targets)) == 0.0
