"""Training: data preparation, losses and the fine-tuning loop."""
