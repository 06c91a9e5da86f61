"""miras: MONETA (MIRAS, Behrouz et al. 2025) as a transformers model, and the stack that trains it."""
__version__ = "0.1.0"
