"""RL algorithms: advantages, per-token losses, aggregation weights (paper symbols inside)."""
