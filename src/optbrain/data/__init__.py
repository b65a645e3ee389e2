"""Built-in data sets used by the experiments and the demo."""

from .digits import DigitsData, load_digits_split, loaders
from .gaussian_mixture import MixtureData, load_gaussian_mixture
from .monk import MonkData, load_monk
from .ph_reactor import PHSequences, SequenceSpec, make_sequences, steady_state
from .waveform import WaveformData, load_waveform_split, make_waveform
from .xor import xor_data, xor_solved

__all__ = [
    "DigitsData",
    "MixtureData",
    "MonkData",
    "PHSequences",
    "SequenceSpec",
    "WaveformData",
    "load_digits_split",
    "load_gaussian_mixture",
    "load_monk",
    "load_waveform_split",
    "loaders",
    "make_sequences",
    "make_waveform",
    "steady_state",
    "xor_data",
    "xor_solved",
]
