"""Training: pretraining and DyDiT fine-tuning (METHOD.md §5, §6)."""
