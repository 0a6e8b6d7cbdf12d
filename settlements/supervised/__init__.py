"""Supervised mapping from the analyst's labels: a top model on the embeddings, fine tuning, honest evaluation."""
