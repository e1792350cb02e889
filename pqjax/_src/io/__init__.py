"""Checkpoints: one module per format behind one registry."""
