"""Image metrics (FID, KID, precision/recall, CLIP score) and the feature extractors they read."""
