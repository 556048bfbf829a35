"""Where code runs: device and thread selection, DDP building blocks, worker-process lifetime."""
