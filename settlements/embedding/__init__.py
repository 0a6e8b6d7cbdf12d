"""Tile embeddings from ImageNet-pretrained CNNs with their classifier removed."""
