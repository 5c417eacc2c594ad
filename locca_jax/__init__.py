"""LocCa in JAX: location-aware captioner pretraining of visual encoders."""
