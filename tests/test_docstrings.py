"""The runnable examples in the engine's docstrings run and print what they show."""
import doctest
import importlib

import pytest

MODULES = [
    "lightning_probes",
    "lightning_probes.probe",
    "lightning_probes.functional.unfold",
    "lightning_probes.functional.spectra",
    "lightning_probes.functional.evbmf",
    "lightning_probes.functional.metrics",
    "lightning_probes.functional.aggregates",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
