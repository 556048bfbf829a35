"""Models: MCTformer-V2 (CAM seeds) and WeakCLIP (its parts in models/weakclip/)."""
