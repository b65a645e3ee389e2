"""Built-in data sets used by the experiments and the demo."""

from .digits import DigitsData, load_digits_split, loaders
from .gaussian_mixture import MixtureData, load_gaussian_mixture
from .monk import MonkData, load_monk
from .stdlib_text import StdlibText, load_stdlib_text
from .waveform import WaveformData, load_waveform_split, make_waveform
from .xor import xor_data, xor_solved

__all__ = [
    "DigitsData",
    "MixtureData",
    "MonkData",
    "StdlibText",
    "WaveformData",
    "load_digits_split",
    "load_gaussian_mixture",
    "load_monk",
    "load_stdlib_text",
    "load_waveform_split",
    "loaders",
    "make_waveform",
    "xor_data",
    "xor_solved",
]
