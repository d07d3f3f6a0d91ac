"""Names of the built-in calibrators and the default scheme (no torch: help texts read them)."""

#: How an observer turns what it saw into a range. ``search`` is RepQ-ViT's: the clipping at the
#: 99.9, 99.99 or 99.999th percentile with the least squared quantisation error.
CALIBRATORS = ("minmax", "percentile", "mse", "search")
DEFAULT_SCHEME = "matmul"
