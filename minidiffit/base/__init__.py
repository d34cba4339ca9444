"""What the core stands on: the command-line shell, run files and checkpoints, seeds and DDP, datasets, the FID network."""
