"""Flax linen models: ViT encoder, text decoder, LocCa."""
