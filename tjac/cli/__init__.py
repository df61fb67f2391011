"""``tjac`` command line: run / info / query / plot / verify / bench / scale / analyze.

Exit codes: 0 success; 1 the computation failed (e.g. a verification disagreed); 2 bad input (one
line on stderr, no traceback). Progress bars appear only on a terminal.

The package, by job: :mod:`.parser` (options, :class:`BadInput`), :mod:`.run` (``run``,
``verify``), :mod:`.store` (``info``, ``query``, ``plot``), :mod:`.bench` (``bench``, ``scale``),
:mod:`.analyze` (``analyze``); here, :func:`main`: dispatch, exit codes, the broken-pipe guard.
"""

from __future__ import annotations

import logging
import os
import sys

from .analyze import cmd_analyze
from .bench import cmd_bench, cmd_scale
from .parser import (BACKENDS, EXIT_BAD_INPUT, EXIT_FAILED, VERIFY_MAX_PARAMS, BadInput, _Parser,
                     build_parser)
from .run import _recipe_from_args, _summary_table, cmd_run, cmd_verify
from .store import cmd_info, cmd_plot, cmd_query

__all__ = ["BACKENDS", "EXIT_BAD_INPUT", "EXIT_FAILED", "VERIFY_MAX_PARAMS", "BadInput", "_Parser",
           "build_parser", "main", "_recipe_from_args", "_summary_table", "cmd_analyze", "cmd_bench",
           "cmd_info", "cmd_plot", "cmd_query", "cmd_run", "cmd_scale", "cmd_verify"]


def _computation_errors() -> tuple:
    """Failures of the computation itself (exit 1): a failed adjoint identity, replays that
    disagree, training that diverged."""
    from ..distributed import RankFailedError, RanksDisagreeError
    from ..runner import ComputationError
    from ..trajectory import NondeterminismError, TrainingDivergedError

    return (ComputationError, NondeterminismError, TrainingDivergedError, RankFailedError,
            RanksDisagreeError)


class _PipeGuard:
    """``sys.stdout`` / ``sys.stderr`` while a command runs: once the reader is gone (``tjac ... |
    head``), the rest of the output goes to ``os.devnull`` (the stream's descriptor is pointed
    there, so Python's final flush is quiet too) and the command carries on, so a store it is
    writing is completed and the exit code is the command's own, not a BrokenPipeError
    traceback."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def main(argv=None) -> int:
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PipeGuard(streams[0]), _PipeGuard(streams[1])
    try:
        return _main(argv)
    finally:
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at exit
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


def _main(argv) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except BadInput as e:
        print(f"tjac: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    level = logging.WARNING if a.quiet else (logging.DEBUG if a.verbose > 1 else
                                             logging.INFO if a.verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from ..store import StoreError

    try:
        return {"run": cmd_run, "info": cmd_info, "query": cmd_query, "plot": cmd_plot,
                "verify": cmd_verify, "bench": cmd_bench, "scale": cmd_scale,
                "analyze": cmd_analyze}[a.cmd](a)
    except _computation_errors() as e:  # before ValueError: a failed check is not bad input
        print(f"tjac: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (BadInput, StoreError, ValueError, TypeError, KeyError, IndexError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tjac: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError as e:
        print(f"tjac: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("tjac: interrupted (resume with --resume)", file=sys.stderr)
        return 130
