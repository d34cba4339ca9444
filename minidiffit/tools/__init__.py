"""What uses the core: tasks, command lines, samplers of trained runs, FID files, latent preparation, pipelines."""
