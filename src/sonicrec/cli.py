"""The ``sonicrec`` command.

Heavy libraries (torch, implicit, music21 ...) are imported inside the command functions only, so
``sonicrec --help`` stays fast. Each command is a pair: ``_add_NAME(subparsers)`` declares its
arguments and ``_run_NAME(args)`` does the work; ``_COMMANDS`` lists them in help order.
Errors the user can fix (``SonicrecError``) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sonicrec import __version__
from sonicrec.errors import SonicrecError

log = logging.getLogger("sonicrec")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"seed {text} must be in [0, 2**32)")
    return value


# --- demo ---------------------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build the demo world and run the whole pipeline on it",
        description=(
            "Render real scores (music21 corpus) to audio, simulate listeners (SIMULATED play "
            "counts), and run every stage of sonicrec on them."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("sonicrec-demo"), help="run directory")
    p.add_argument("--quick", action="store_true", help="small world and short training (~3 min)")
    p.add_argument("--tracks", type=_positive_int, help="number of tracks (overrides the preset)")
    p.add_argument("--users", type=_positive_int, help="number of simulated users")
    p.add_argument("--plays", type=_positive_int, help="number of simulated play events")
    p.add_argument("--seed", type=_seed, default=0, help="seed of everything random")
    p.add_argument("--cache", type=Path, help="rendered-audio cache (default ~/.cache/sonicrec)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from sonicrec.demo import DemoOptions, run_demo

    options = DemoOptions.preset(
        quick=args.quick,
        n_tracks=args.tracks,
        n_users=args.users,
        n_plays=args.plays,
        seed=args.seed,
        cache_dir=args.cache,
        show_progress=args.progress,
    )
    summary = run_demo(args.out, options)
    print(summary)


_COMMANDS = [_add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sonicrec",
        description="Recommend music by how it sounds: audio -> CNN -> collaborative-filtering space.",
    )
    parser.add_argument("--version", action="version", version=f"sonicrec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        args.progress = False
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except SonicrecError as exc:
        print(f"sonicrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sonicrec {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
