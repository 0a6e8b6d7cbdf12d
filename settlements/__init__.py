"""settlements: map settlements from imagery with pretrained CNN embeddings and k-means."""

__version__ = "0.1.0"
