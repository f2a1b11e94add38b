"""Faster drop-in kernels for pieces of the models lexfine trains (each one optional and tested against the
transformers reference)."""
