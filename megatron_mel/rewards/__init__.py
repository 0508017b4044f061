"""Reward functions and answer extraction for math RL (kept import-light on purpose)."""
