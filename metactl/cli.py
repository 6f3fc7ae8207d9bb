"""The ``metactl`` command: ``metactl reproduce``, ``metactl gym-study``, ``metactl scoreboard``.

Every subcommand is a lab command (``metactl.adapters.lab``) imported lazily, so ``metactl
--help`` works with the core alone.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with main(argv) -> int, one-line help, extra that provides it)
COMMANDS = {
    "reproduce": (
        "metactl.adapters.lab.reproduce.cli",
        "run the paper's comparison (TAMPO vs fixed and scheduled temperatures) and write a report",
        "metactl[reference]",
    ),
    "gym-study": (
        "metactl.adapters.lab.gym_study",
        "compare every controller on the TokenSearch toy environment over many seeds",
        "metactl[gym]",
    ),
    "scoreboard": (
        "metactl.adapters.lab.scoreboard.cli",
        "every controller on every testbed of the declared suite: regret table and heat-map",
        "metactl[gym]",
    ),
}


def _usage() -> str:
    lines = ["usage: metactl <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_, _) in COMMANDS.items()]
    lines += ["", "Run 'metactl <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if args[0] in {"-V", "--version"}:
        from . import __version__

        print(f"metactl {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"metactl: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, extra = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(
            f"metactl {command} needs the optional dependencies: pip install '{extra}' ({exc})",
            file=sys.stderr,
        )
        return 1
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
