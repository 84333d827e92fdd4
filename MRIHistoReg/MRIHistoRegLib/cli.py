"""Command-line entry point: `python -m MRIHistoRegLib <command> ...`.

Each subcommand is a thin adapter: parse arguments, call the logic, print a summary. Heavy imports stay
inside the command functions so `--help` is instant.
"""
import argparse
import logging
import sys


def _addSample(subparsers):
    p = subparsers.add_parser("sample", help="write the generated sample data set (MRI, LSM stack, landmarks, truth)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--size", default="small", help="small (default, fast) or full (the seed's 2160x2560x472 stack, 5.2 GB)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_runSample)


def _runSample(args):
    from MRIHistoRegLib import sampledata
    from MRIHistoRegLib.progress import TerminalProgress

    manifest = sampledata.generateSampleData(args.out, size=args.size, seed=args.seed, progress=TerminalProgress("sample"))
    logging.info("sample data written to %s", manifest["folder"])
    return 0


def buildParser():
    parser = argparse.ArgumentParser(prog="python -m MRIHistoRegLib", description="MRI to light-sheet histology registration")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


# Subcommand registrations, in the order of the pipeline.
_SUBCOMMANDS = [_addSample]


def main(argv=None) -> int:
    parser = buildParser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as error:  # user-facing errors carry the fix in their message
        logging.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
