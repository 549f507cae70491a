"""segjax: image segmentation with JAX and Flax NNX."""
