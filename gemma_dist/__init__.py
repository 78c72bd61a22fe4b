"""gemma_dist: serve Google's Gemma models."""
