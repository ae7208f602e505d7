"""Command-line entry points: `hf-transfer train ...` (scripts/train.py is the same thing).

User mistakes end with one line on stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import sys

from hf_transfer.errors import HfTransferError


def _add_train(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("train", help="Train a model as a recipe says.")
    add_train_arguments(parser)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="Recipe name (in recipes/) or path to a YAML file.")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="Override recipe keys, dotted, values read as YAML: --set training.lr=3e-5 data.path=DIR",
    )
    parser.add_argument("--output-dir", help="Output folder (same as --set output.dir=...).")
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty output folder.")


def train_command(args: argparse.Namespace) -> None:
    from hf_transfer.recipe import load_recipe
    from hf_transfer.run import run_training

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output.dir={args.output_dir}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    run_training(load_recipe(args.recipe, overrides))


COMMANDS = {"train": train_command}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-transfer", description="Transfer learning on the Hugging Face stack.")
    subcommands = parser.add_subparsers(dest="command", required=True)
    _add_train(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except HfTransferError as error:
        print(f"hf-transfer: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
