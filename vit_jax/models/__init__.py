"""Flax modules for ViT and its hybrid, with parameter names of the original checkpoints."""
