"""Built-in data sets used by the experiments and the demo."""

from .contiguity import ContiguityData, contiguity_split, load_contiguity
from .digits import DigitsData, load_digits_split, loaders
from .gaussian_mixture import MixtureData, load_gaussian_mixture
from .mackey_glass import MackeyGlassData, load_mackey_glass, mackey_glass
from .monk import MonkData, load_monk
from .ph_reactor import PHSequences, SequenceSpec, make_sequences, steady_state
from .stdlib_text import StdlibText, load_stdlib_text
from .sunspots import SunspotData, load_sunspots
from .waveform import WaveformData, load_waveform_split, make_waveform
from .xor import xor_data, xor_solved

__all__ = [
    "ContiguityData",
    "DigitsData",
    "MackeyGlassData",
    "SunspotData",
    "contiguity_split",
    "load_contiguity",
    "load_mackey_glass",
    "load_sunspots",
    "mackey_glass",
    "MixtureData",
    "MonkData",
    "StdlibText",
    "PHSequences",
    "SequenceSpec",
    "WaveformData",
    "load_digits_split",
    "load_gaussian_mixture",
    "load_monk",
    "load_stdlib_text",
    "load_waveform_split",
    "loaders",
    "make_sequences",
    "make_waveform",
    "steady_state",
    "xor_data",
    "xor_solved",
]
