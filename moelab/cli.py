"""`moelab <command>`: one argparse CLI; each command lives in `moelab/commands/<name>.py`.

A command module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int | None`.
Modules are discovered, so adding a command never touches this file. User errors (`UserError`)
print one line and exit 2; nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from moelab.errors import UserError
from moelab.runtime import tune_cpu_allocator
from moelab.version import __version__


def _command_modules():
    import moelab.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"moelab.commands.{info.name}")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (argparse would print the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moelab",
        description="Mixture-of-Experts language models: tokenizer, data, model, training, analysis, serving.",
    )
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    tune_cpu_allocator()
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"moelab {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moelab {args.command}: interrupted", file=sys.stderr)
        return 130


def exit_process(code: int) -> None:
    """Exit with `code`. A torchrun rank leaves through os._exit once its work is written and its process
    groups destroyed: DTensor meshes keep gloo process groups alive until interpreter finalization, and
    destroying their worker threads there aborted ranks (SIGABRT) after a finished run, about 1 run in
    10 on a loaded machine, which torchrun then reports as a failed job."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run() -> None:
    """The console script: `moelab ...`."""
    exit_process(main())


if __name__ == "__main__":
    run()
