"""What the stages pass between them on disk: atomic writes and checksums, state-dict unwrapping, the
CAM store, the CLIP and WeakCLIP artifacts and the final model files."""
