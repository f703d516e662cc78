"""Command-line glue shared by `python -m sinkd_ray.train` and `python -m sinkd_ray.tune`.

Config dataclasses are the single source of truth: every field becomes a ``--flag`` whose help text is the
field's ``metadata["help"]`` and whose default is the field's default, so `--help` can never drift from the
code. Errors the user can fix (:class:`SinkdError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from sinkd_ray.errors import SinkdError


def _base_type(annotation: Any) -> type:
    """``int | None`` -> int, ``Optional[str]`` -> str, ``bool`` -> bool."""
    if isinstance(annotation, str):  # postponed annotations
        annotation = eval(annotation, vars(typing) | {"types": types})  # noqa: S307 - our own source
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_config_args(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (), group: str | None = None
) -> None:
    """Add one ``--field-name`` per dataclass field (booleans get ``--x`` / ``--no-x``).

    Use with ``argparse.ArgumentDefaultsHelpFormatter``, which appends each default to the help text.
    """
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = _base_type(hints[f.name])
        choices = f.metadata.get("choices")
        if kind is bool:
            target.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            metavar = None if choices else f.metadata.get("metavar", kind.__name__.upper())
            target.add_argument(
                flag, dest=f.name, type=kind, default=default, choices=choices, metavar=metavar, help=help_text
            )


def config_from_args(cls: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """Build (and so validate) ``cls`` from the parsed flags that belong to it."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    values.update(overrides)
    return cls(**values)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, except that a negative number after a flag is its value: argparse reads
    ``--lr -1e-5`` as two flags ("expected one argument") instead of handing -1e-5 to the range check."""
    argv = list(sys.argv[1:] if argv is None else argv)
    joined: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if (
            token.startswith("--")
            and "=" not in token
            and i + 1 < len(argv)
            and argv[i + 1].startswith("-")
            and _is_number(argv[i + 1])
        ):
            joined.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        joined.append(token)
        i += 1
    return parser.parse_args(joined)


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags the user actually typed (``--x v`` or ``--x=v``), defaults excluded."""
    typed = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return {a.dest for a in parser._actions if typed & set(a.option_strings)}


# After its last line a command must end: the shutdown handlers (Ray's, MLflow's) once kept a finished
# `train --stage teacher` alive for minutes under load. They get this long, then the process exits anyway.
EXIT_TIMEOUT_ENV = "SINKD_EXIT_TIMEOUT_S"


def _exit(code: int, process: bool) -> None:
    """``sys.exit(code)``; when it ends the ``process`` (a command line, not a call from tests), with a daemon
    watchdog that ends it anyway if the interpreter's shutdown (joining threads, atexit handlers: daemon threads
    still run meanwhile) outlasts ``$SINKD_EXIT_TIMEOUT_S`` (default 60 s)."""
    import os
    import threading
    import time

    if not process:
        sys.exit(code)
    limit = float(os.environ.get(EXIT_TIMEOUT_ENV, "60"))

    def force() -> None:
        time.sleep(limit)
        print(f"(shutting down took over {limit:.0f} s: exiting without waiting further)", file=sys.stderr)
        sys.stderr.flush()
        os._exit(code)

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    threading.Thread(target=force, name="sinkd-exit-watchdog", daemon=True).start()
    sys.exit(code)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``main`` and turn a :class:`SinkdError` into ``error: <message>`` and exit code 2. Without ``argv``
    (the process's own command line) the process then ends, within ``$SINKD_EXIT_TIMEOUT_S`` (`_exit`)."""
    process = argv is None
    if process:  # `kill`, a scheduler's stop, a closed terminal: the same graceful stop as Ctrl+C
        import os
        import signal

        signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        code = main(argv)
    except SinkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _exit(2, process)
    except KeyboardInterrupt:
        print(
            "interrupted: what finished is kept (teachers, logit caches, checkpoints); rerun the same command to "
            "continue (a study that had started: add --resume)",
            file=sys.stderr,
        )
        _exit(130, process)
    _exit(code or 0, process)
