"""Optimizer, train state, step functions, loop and checkpoints."""
