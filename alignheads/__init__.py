"""alignheads: test-time alignment of frozen causal LMs with trained logit heads."""

__version__ = "0.1.0"
