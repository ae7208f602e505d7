"""Command-line entry points: `hf-transfer train ...`, `hf-transfer rank ...`, ... (scripts/ are the same).

User mistakes end with one line on stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from hf_transfer.errors import HfTransferError


def _console_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    shown = flags.add_mutually_exclusive_group()
    shown.add_argument("--verbose", action="store_true",
                       help="Also show the libraries' own messages (load reports, dataset bars, warnings).")
    shown.add_argument("--quiet", action="store_true",
                       help="Show only errors and the command's own output (no progress bars, no run account).")
    return flags


CONSOLE_FLAGS = _console_flags()


def _add_train(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("train", parents=[CONSOLE_FLAGS], help="Train a model as a recipe says.")
    add_train_arguments(parser)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="Recipe name (in recipes/) or path to a YAML file.")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="Override recipe keys, dotted, values read as YAML: --set training.lr=3e-5 data.path=DIR",
    )
    parser.add_argument("--output-dir", help="Output folder (same as --set output.dir=...).")
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty output folder.")
    parser.add_argument(
        "--resume", nargs="?", const="latest", metavar="CHECKPOINT",
        help="Continue a stopped run: alone, from the newest checkpoint in the output folder; or from "
        "this checkpoint folder (or output folder). Use the recipe and overrides the run started with.",
    )


def train_command(args: argparse.Namespace) -> None:
    from hf_transfer.ladder import run_ladder
    from hf_transfer.recipe import load_recipe
    from hf_transfer.run import run_training

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output.dir={args.output_dir}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    recipe = load_recipe(args.recipe, overrides)
    args.run_folder = recipe.output_dir  # for the message an interrupted run ends with
    # strategy auto is a search over strategies (ladder/); every other name is one strategy's run
    run = run_ladder if recipe.strategy.name == "auto" else run_training
    run(recipe, resume=args.resume)


def _add_rank(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "rank", parents=[CONSOLE_FLAGS],
        help="Rank candidate source models on the recipe's data by transferability scores, before training any.",
    )
    parser.add_argument("--recipe", required=True,
                        help="Recipe name (in recipes/) or path to a YAML file: its task, data and settings.")
    parser.add_argument(
        "--candidates", nargs="+", metavar="MODEL",
        help="Source models to compare (Hub ids, local folders, timm names); default: the recipe's rank.candidates.",
    )
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="Override recipe keys, dotted, values read as YAML: --set rank.score=logme",
    )
    parser.add_argument("--output-dir",
                        help="Folder for ranking.json and the feature cache (default runs/<recipe>-rank).")
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty output folder.")


def rank_command(args: argparse.Namespace) -> None:
    import shlex
    from pathlib import Path

    from hf_transfer.recipe import load_recipe
    from hf_transfer.selection.rank import rank_models, ranking_table

    recipe = load_recipe(args.recipe, args.overrides)
    ranking = rank_models(recipe, args.candidates, Path(args.output_dir) if args.output_dir else None,
                          overwrite=args.overwrite or recipe.output.overwrite)
    print(ranking_table(ranking))
    if ranking["winner"] is not None:  # the features are cached: this train run computes none again
        frozen = ["strategy.name=freeze_backbone"] + (["strategy.head_first=false"] if recipe.strategy.head_first is True else [])
        frozen += ["training.time_budget=null"] if recipe.training.time_budget is not None else []
        # the precision rank computed in (a frozen run's auto would pick fp32): the cache keys carry it
        frozen += [f"training.mixed_precision={ranking['mixed_precision']}"] if ranking["mixed_precision"] != "no" else []
        settings = [*args.overrides, f"model.name={ranking['winner']}", *frozen,
                    f"training.feature_cache_dir={ranking['feature_cache_dir']}"]
        print("train it: " + shlex.join(["hf-transfer", "train", "--recipe", args.recipe, "--set", *settings]))


def _add_push(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("push", parents=[CONSOLE_FLAGS], help="Upload an output folder to the Hugging Face Hub (one commit).")
    parser.add_argument("output_dir", help="Output folder of a finished run.")
    parser.add_argument("--repo-id", required=True, help="Hub repository, user/name or org/name; created if missing.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="Seconds to wait for any one response from the Hub (default 60)."
    )


def push_command(args: argparse.Namespace) -> None:
    """The token comes from `hf auth login` or HF_TOKEN, the server from HF_ENDPOINT (huggingface_hub's way)."""
    from hf_transfer.export.hub import push_folder

    if args.timeout <= 0:
        raise HfTransferError("--timeout must be a positive number of seconds.")
    url = push_folder(args.output_dir, args.repo_id, private=args.private, timeout=args.timeout)
    print(f"pushed {args.output_dir} to {url}")


def _add_evaluate(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "evaluate", parents=[CONSOLE_FLAGS], help="Score a saved model on labelled data: metrics.json and a confusion matrix."
    )
    parser.add_argument("output_dir", help="Output folder of a finished run (text or image).")
    parser.add_argument(
        "--data", required=True,
        help="Labelled data: a data file, a folder of split files (or image class folders), or a Hub dataset id.",
    )
    parser.add_argument(
        "--split", help="Which split of --data to score (default: test, else validation, else the only one)."
    )
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="Data keys of the run's recipe to change for this data, e.g. --set data.text_column=review",
    )
    parser.add_argument("--name", help="Subfolder of OUTPUT/evaluations for the results (default: the data's name).")
    parser.add_argument("--batch-size", type=int, default=64, help="Examples per forward pass.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier evaluation of the same name.")
    add_transcribe_argument(parser, "--data is labelled audio (class folders or a table, read as task audio reads it)")
    add_trust_argument(parser)


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="Let a text model folder run its own modelling code (config.json auto_map); off unless you trust it.",
    )


def evaluate_command(args: argparse.Namespace) -> None:
    from hf_transfer.inference.evaluate import evaluate_saved_model

    if args.batch_size < 1:
        raise HfTransferError("--batch-size must be >= 1.")
    result = evaluate_saved_model(
        args.output_dir, args.data, split=args.split, overrides=args.overrides, name=args.name,
        batch_size=args.batch_size, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
        transcribe=args.transcribe,
    )
    print(
        f"accuracy {result.metrics['accuracy']:.4f}, macro F1 {result.metrics['f1_macro']:.4f} on "
        f"{result.metrics['num_samples']} examples; written to {result.folder}"
    )


def _add_predict(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("predict", parents=[CONSOLE_FLAGS], help="Label images or texts with a saved model.")
    add_predict_arguments(parser)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="Output folder of a run (or any timm export folder).")
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="Image model: image files and/or folders (searched recursively). Text model: texts, or files of "
        "texts (.txt one per line; csv/tsv/jsonl/parquet: the recipe's text column).",
    )
    parser.add_argument("--top-k", type=int, default=1, help="Print the k most likely labels per input.")
    parser.add_argument("--batch-size", type=int, default=32, help="Inputs per forward pass.")
    parser.add_argument("--text-column", help="Text model: the column of texts in table files (default: the recipe's).")
    parser.add_argument("--format", choices=("tsv", "json"), default="tsv",
                        help="tsv: input, label, probability per line; json: one JSON object per line.")
    add_transcribe_argument(parser, "the inputs are audio files (and folders)")
    add_trust_argument(parser)


def add_transcribe_argument(parser: argparse.ArgumentParser, inputs: str) -> None:
    parser.add_argument(
        "--transcribe", metavar="RECOGNISER",
        help=f"Text model on speech: {inputs}, transcribed by this speech recogniser (a Whisper or CTC model: "
        "a Hub id, e.g. openai/whisper-tiny.en, which works offline, or a local folder), and the text model labels "
        "the transcripts.",
    )


def predict_command(args: argparse.Namespace) -> None:
    from hf_transfer.inference.predict import format_prediction, predict

    if args.top_k < 1 or args.batch_size < 1:
        raise HfTransferError("--top-k and --batch-size must be >= 1.")
    predictions = predict(args.model_dir, args.inputs, args.top_k, args.batch_size, args.text_column,
                          trust_remote_code=args.trust_remote_code, transcribe=args.transcribe)
    for prediction in predictions:
        print(format_prediction(prediction, args.format), flush=True)


def _add_optimize(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "optimize", parents=[CONSOLE_FLAGS],
        help="Make a finished run's model smaller and faster for inference: prune, int8, ONNX (OUT/optimized/).",
    )
    parser.add_argument("output_dir", help="Output folder of a finished text or image run (read, never changed).")
    parser.add_argument("--prune", type=float, metavar="RATIO",
                        help="Remove this share (0 < RATIO < 1) of every layer's attention heads and FFN neurons (text) "
                             "or of each CNN block's channels (images), the least important first.")
    parser.add_argument("--quantize", choices=("int8",), help="int8 dynamic quantisation of the linear layers (CPU).")
    parser.add_argument("--onnx", action="store_true", help="Export to ONNX (LoRA merged first) and serve with ONNX Runtime.")
    parser.add_argument("--recovery-epochs", type=int, default=0, metavar="N",
                        help="After pruning, fine-tune N epochs on the run's training data with its recipe.")
    parser.add_argument("--output-dir", dest="destination", help="Where to write (default OUTPUT_DIR/optimized).")
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty destination.")
    add_trust_argument(parser)


def optimize_command(args: argparse.Namespace) -> None:
    from hf_transfer.optimize import OptimizeRequest, optimize_run

    request = OptimizeRequest(prune=args.prune, quantize=args.quantize, onnx=args.onnx,
                              recovery_epochs=args.recovery_epochs)
    result = optimize_run(args.output_dir, request, args.destination, overwrite=args.overwrite,
                          trust_remote_code=args.trust_remote_code)
    accuracy, size = result.manifest["accuracy"], result.manifest["size_bytes"]
    print(f"validation accuracy {accuracy['before']:.4f} -> {accuracy['after']:.4f}, "
          f"{size['before'] / 1e6:.2f} MB -> {size['after'] / 1e6:.2f} MB; written to {result.folder}")


def _add_recipes(subcommands: argparse._SubParsersAction) -> None:
    subcommands.add_parser("recipes", parents=[CONSOLE_FLAGS], help="List the recipes --recipe can name, with what each does.")


def recipes_command(args: argparse.Namespace) -> None:
    from hf_transfer.recipe import available_recipes, find_recipe
    from hf_transfer.recipe.files import read_yaml

    for name in available_recipes():
        path = find_recipe(name)
        values = read_yaml(path.read_text(), f"Recipe {path}") or {}
        description = values.get("description", "") if isinstance(values, dict) else ""
        print(f"{name}\t{description}")


COMMANDS = {
    "train": train_command,
    "predict": predict_command,
    "evaluate": evaluate_command,
    "push": push_command,
    "recipes": recipes_command,
    "rank": rank_command,
    "optimize": optimize_command,
}


def build_parser() -> argparse.ArgumentParser:
    from hf_transfer import __version__

    parser = argparse.ArgumentParser(prog="hf-transfer", description="Transfer learning on the Hugging Face stack.")
    parser.add_argument("--version", action="version", version=f"hf-transfer {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True)
    _add_train(subcommands)
    _add_predict(subcommands)
    _add_evaluate(subcommands)
    _add_push(subcommands)
    _add_recipes(subcommands)
    _add_rank(subcommands)
    _add_optimize(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hf_transfer.console import configure

    configure(verbose=args.verbose, quiet=args.quiet)
    if args.command == "train":
        from hf_transfer.launch import requested_cpu_processes, run_cpu_processes

        processes = requested_cpu_processes()  # `accelerate launch --cpu` started only this one
        if processes > 1:
            return run_cpu_processes(processes)
    try:
        COMMANDS[args.command](args)
    except HfTransferError as error:
        print(f"hf-transfer: error: {one_line(error)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `hf-transfer predict ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRORS:
            raise
        place = f" ({error.filename})" if error.filename else ""
        print(f"hf-transfer: error: {error.strerror}{place}; free space or fix the permissions, then run again.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-transfer: interrupted.{resume_hint(args)}", file=sys.stderr)
        return 130
    return 0


# a full disk or a folder the user may not write: the environment, not a bug; one line, not a traceback
ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def one_line(error: HfTransferError) -> str:
    """The error's message on one line; raised in a DataLoader worker, it arrives after the worker's traceback."""
    text = str(error)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].partition(": ")[2] or text
    return " ".join(text.split())


def resume_hint(args: argparse.Namespace) -> str:
    from hf_transfer.training.checkpoint import CHECKPOINTS_DIR, list_checkpoints

    folder = getattr(args, "run_folder", None)
    found = list_checkpoints(folder / CHECKPOINTS_DIR) if folder is not None else []
    if not found:
        return ""
    return f" The last checkpoint is {found[-1]}; run the same command with --resume to continue from it."


if __name__ == "__main__":
    sys.exit(main())
