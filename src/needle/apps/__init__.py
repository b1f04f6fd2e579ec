"""Ready-made models, data sources and the training loop behind ``python -m needle``."""
