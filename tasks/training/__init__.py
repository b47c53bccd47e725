"""The one training loop for every method, its batches, checkpoints, LoRA wrapping and multi-process entry point."""
