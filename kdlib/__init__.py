"""kdbook's library: data, models, losses, distillers, training, metrics, plots, runner."""
__version__ = "0.1.0"
