"""Built-in data sets used by the experiments and the demo."""

from .digits import DigitsData, load_digits_split, loaders

__all__ = ["DigitsData", "load_digits_split", "loaders"]
