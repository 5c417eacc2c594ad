"""Input side: TFDS sources (incl. the built-in locca_shapes), preprocessing, task sequences."""
