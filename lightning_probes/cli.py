"""The ``lightning-probes`` command line (also ``python -m lightning_probes``).

Each sub-command lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help)
COMMANDS = {
    "generate": ("lightning_probes.generate", "train a GenProb model zoo on digits (GenProb checkpoints)"),
    "replay": ("lightning_probes.replay", "probe checkpoints offline: table, errors, TensorBoard"),
    "correlate": ("lightning_probes.correlate", "rank a zoo's models by each measure: correlations, early prediction, figures"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-probes",
        description="Layer-wise probeable generalization measures (GenProb).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=module.__doc__,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
