"""uce_nf: a faithful, fast Universal Cell Embeddings (UCE) engine for the uce-nf pipeline."""

__version__ = "0.1.0"
