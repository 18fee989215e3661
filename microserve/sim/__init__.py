"""Simulated engines: the real engine with the model's forward pass replaced by a cost model."""
