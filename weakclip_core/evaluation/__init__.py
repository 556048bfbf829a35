"""Scoring and pictures: confusion matrices, mIoU, AP, and the palette overlays every report draws."""
