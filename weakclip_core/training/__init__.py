"""Training machinery shared by every trainer: the one training loop, lr schedules, resumable checkpoints,
and the CLIP contrastive pre-training recipe."""
