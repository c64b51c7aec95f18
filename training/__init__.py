"""Stage 2: DIP post-training of an encoder on pseudo in-context tasks."""
