"""Importing the package has no side effects, and the CLI entry point answers."""
import subprocess
import sys

CHECK_IMPORT = """
import logging, sys, warnings
import torch
filters, handlers, threads = list(warnings.filters), list(logging.root.handlers), torch.get_num_threads()
level = logging.root.level
import lightning_probes, lightning_probes.functional, lightning_probes.probe
assert warnings.filters == filters, "warnings filters changed"
assert logging.root.handlers == handlers and logging.root.level == level, "logging configured"
assert torch.get_num_threads() == threads, "thread settings changed"
assert "pytorch_lightning" not in sys.modules and "lightning" not in sys.modules, "Lightning imported"
print("clean")
"""


def test_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", CHECK_IMPORT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"


def test_functional_core_imports_no_lightning():
    code = "import sys, lightning_probes.functional; print(any('lightning.' in m or m.startswith(('lightning', 'pytorch_lightning')) and m != 'lightning_probes' and not m.startswith('lightning_probes') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "lightning_probes", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "lightning-probes" in out.stdout
