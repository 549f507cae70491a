"""Every shell command in README.md and docs/ is either run, or marked as needing what a checkout
lacks; either way its flags and `--set` keys exist. The docs site's pages are all in its nav.

A command is the text of a fenced ```bash block, backslash continuations joined. It is covered by
(a) `.ci/run`, which holds it verbatim (README's two set-up commands), (b) a marker comment on its
line or the line above (`# needs real data`, ...: MARKERS), or (c) DEMO_TESTS, which names the test
that runs it on demo data. Each `python -m segjax.X` / `python tools/Y.py` part of a command is
parsed by that entry point's own argument parser (its `main` is stopped right after parsing), and
a `segjax.train` command is resolved into its validated config, as training would resolve it.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, load_tool

from segjax import cli
from segjax import config as config_lib

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKERS = ("needs real data", "needs a run", "needs a GPU", "needs a cluster", "long benchmark")

# Commands that need nothing but a checkout, each with the test that runs it (on smaller demo data
# or a shorter schedule where the command would take minutes).
DEMO_TESTS = {
    "python -m segjax.train --experiment voc_resnet":
        "test_semantic_task.py::test_train_then_test_mode_writes_predictions",
    "python -m segjax.train --experiment coco_semantic":
        "test_semantic_task.py::test_coco_semantic_trains_several_models",
    "python -m segjax.train --experiment coco_semantic --models fastscnn":
        "test_semantic_task.py::test_coco_semantic_trains_several_models",
    "python -m segjax.train --experiment hybrid_p3m":
        "test_query_masks.py::test_training_run_directory_and_metrics",
    "python -m segjax.train --experiment hybrid_p3m --mode overfit":
        "test_query_masks.py::test_overfit_mode_drives_the_loss_down",
    "python -m segjax.train --experiment roadways_mask2former":
        "test_roadways.py::test_training_run",
    "python -m segjax.train --experiment roi_human --set optim.lr=3e-4 --epochs 5 --print_config":
        "test_config.py::test_print_config",
    "python tools/benchmark.py --experiment roi_human --repeats 10":
        "test_benchmark_tool.py::test_benchmark_prints_timings_and_ratios",
    "python tools/benchmark.py --against torch --onnx --repeats 2 --json speed.json":
        "test_benchmark_tool.py::test_against_torch_times_both_frameworks_and_onnx",
    "python tools/benchmark.py --against torch --models fastscnn,unet --rounds 2":
        "test_benchmark_tool.py::test_against_torch_times_both_frameworks_and_onnx",
    "bash tools/gpu_bench.sh --dry_run gpu_bench_dry":
        "test_benchmark_tool.py::test_gpu_bench_dry_run_writes_json_and_markdown",
}


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str  # continuation lines joined, trailing comment removed
    marker: str | None

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def _comment(line: str) -> tuple[str, str | None]:
    """(code, comment text) of one line; a comment starts at a `#` after whitespace."""
    parts = re.split(r"(?:^|\s+)#\s?", line, maxsplit=1)
    return parts[0].rstrip(), (parts[1].strip() if len(parts) > 1 else None)


def _marker(comment: str | None) -> str | None:
    return next((m for m in MARKERS if comment and comment.startswith(m)), None)


def doc_commands(path: Path) -> list[Command]:
    commands, block, above, pending = [], None, None, None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
            above = pending = None
            continue
        if block != "bash" or not line:
            continue
        code, comment = _comment(line)
        if pending is None and not code:  # a comment line: may mark the command below
            above = comment
            continue
        if pending is None:
            pending = (number, [], _marker(above))
        pending[1].append(code.removesuffix("\\").strip())
        above = None
        if not code.endswith("\\"):
            start, parts, marker = pending
            commands.append(Command(f"{path.relative_to(ROOT)}:{start}", " ".join(parts), marker or _marker(comment)))
            pending = None
    return commands


ALL = [c for path in DOCS for c in doc_commands(path)]
CI_LINES = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip install")]
# .ci/run makes its virtual environment with the Python >= 3.12 it finds, then runs the rest.
VENV = "python3.12 -m venv .venv && . .venv/bin/activate && "


def run_by_ci(command: Command) -> bool:
    return command.text.removeprefix(VENV) in CI_LINES


def test_every_command_is_run_or_marked():
    assert len(ALL) > 40, "the extraction found too few commands"
    uncovered = [str(c) for c in ALL if c.marker is None and not run_by_ci(c) and c.text not in DEMO_TESTS]
    assert not uncovered, "commands neither run by .ci/run nor named in DEMO_TESTS nor marked " \
                          f"({', '.join('# ' + m for m in MARKERS)}):\n" + "\n".join(uncovered)


def test_demo_commands_are_in_the_docs_and_their_tests_exist():
    texts = {c.text for c in ALL}
    assert not set(DEMO_TESTS) - texts, "DEMO_TESTS names commands the docs no longer have"
    for test in set(DEMO_TESTS.values()):
        file, name = test.split("::")
        functions = {n.name for n in ast.walk(ast.parse((ROOT / "tests" / file).read_text()))
                     if isinstance(n, ast.FunctionDef)}
        assert name in functions, f"{test} does not exist"


def test_readme_set_up_commands_are_what_ci_runs():
    """README's two set-up commands, in order, are what .ci/run runs (after making its venv)."""
    readme = [c.text for c in doc_commands(ROOT / "README.md")]
    assert len(CI_LINES) == 2 and readme[:2] == [VENV + CI_LINES[0], CI_LINES[1]]
    assert "mkdocs build --strict" in CI_LINES[1] and "ruff check ." in CI_LINES[1]
    assert CI_LINES[1].endswith("python -m pytest -q")


def test_docs_site_lists_every_page_and_readme_links_resolve():
    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert site.get("strict") is True

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from (pages(value) if isinstance(value, list) else [value])

    listed = set(pages(site["nav"]))
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert listed == on_disk
    # mkdocs checks the links between pages; README's links into docs/ are checked here.
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", readme)
    assert targets and all((ROOT / t).exists() for t in targets), [t for t in targets if not (ROOT / t).exists()]
    assert len(readme.splitlines()) < 200


# Flags the docs name that belong to other programs: argparse, mkdocs, pip, tensorboard, XLA, SLURM.
OTHER_FLAGS = {"help", "strict", "no-deps", "logdir", "xla_cpu_use_onednn", "xla_cpu_experimental_onednn_custom_call",
               "xla_cpu_experimental_ynn_fusion_type", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task",
               "signal", "requeue"}


def test_every_flag_named_in_the_docs_exists():
    """Prose included: each `--name` is a literal option of segjax or tools/, or a config field flag."""
    sources = [*(ROOT / "segjax").rglob("*.py"), *(ROOT / "tools").glob("*.py"), *(ROOT / "tools").glob("*.sh")]
    defined = {f for p in sources for f in re.findall(r"""["']--([a-zA-Z][\w-]*)["']""", p.read_text())}
    for name in config_lib.builtin_experiments():
        defined |= set(config_lib.flags(config_lib.load_experiment(name)))
    unknown = {f"--{f} ({path.relative_to(ROOT)})" for path in DOCS
               for f in re.findall(r"(?<![\w-])--([a-zA-Z][\w-]*)", path.read_text())
               if f not in defined | OTHER_FLAGS}
    assert not unknown, sorted(unknown)


# ------------------------------------------------------------------------------------------------
# Flags: each segjax / tools invocation parses with its entry point's own parser
# ------------------------------------------------------------------------------------------------
class _Parsed(BaseException):  # BaseException: passes through the entry points' error handlers
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def _shell_words(text: str) -> list[str]:
    text = re.sub(r"\$\{\w+:\+([^}]*)\}", r"\1", text)  # ${VAR:+word} -> word
    text = re.sub(r"\$\{?\w+\}?", "0", text)  # $VAR -> a value
    return shlex.split(text)


def invocations(command: Command) -> list[tuple[str, list[str]]]:
    """(entry point, arguments) of each segjax or tools/ Python call in a command."""
    words, calls = _shell_words(command.text), []
    parts = [[]]
    for w in words:
        parts.append([]) if w in ("&&", "||", ";", "|") else parts[-1].append(w)
    for part in parts:
        while part and (re.fullmatch(r"\w+=.*", part[0]) or part[0] in ("time", "srun")):
            part = part[1:]
        if part[:1] == ["python"] and part[1:2] == ["-m"] and part[2].startswith("segjax."):
            calls.append((part[2], part[3:]))
        elif part[:1] == ["python"] and len(part) > 1 and part[1].startswith("tools/"):
            calls.append((part[1], part[2:]))
    return calls


def _entry_main(entry: str):
    if entry.startswith("tools/"):
        return load_tool(Path(entry).stem).main
    return importlib.import_module(entry).main


def _parse(entry: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """The namespace `entry`'s main parses from argv (main stops right after parsing)."""
    original = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    main = _entry_main(entry)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        m.setattr(sys, "argv", [entry, *argv])
        m.syspath_prepend(str(ROOT / "tools"))  # tools/benchmark.py imports its siblings
        try:
            main(argv) if inspect.signature(main).parameters else main()
        except _Parsed as parsed:
            return parsed.namespace
    raise AssertionError(f"{entry} returned without parsing its arguments")


CALLS = [(c, entry, argv) for c in ALL for entry, argv in invocations(c)]


def test_the_calls_were_found():
    entries = {entry for _, entry, _ in CALLS}
    assert {"segjax.train", "segjax.evaluate", "segjax.predict", "segjax.serve_bench",
            "tools/export_onnx.py", "tools/benchmark.py", "tools/select_subset.py"} <= entries


@pytest.mark.parametrize("command,entry,argv", CALLS, ids=[f"{c.where}:{e}" for c, e, _ in CALLS])
def test_flags_and_keys_exist(command, entry, argv, monkeypatch, capsys):
    try:
        if entry == "segjax.train" and "--resume" not in argv:
            # The whole command line as training resolves it: flags, --set keys and values, --models.
            from segjax import train

            cfg, args = train.resolve_config(argv, demo=False)
            train.models_to_train(cfg, args)
            return
        namespace = _parse(entry, argv, monkeypatch)
    except SystemExit as e:
        pytest.fail(f"{command}\n{entry} refused its arguments (exit {e.code}): {capsys.readouterr().err.strip()}")
    except config_lib.ConfigError as e:
        pytest.fail(f"{command}\n{e}")
    if getattr(namespace, "experiment", None) and hasattr(namespace, "set"):
        # --set keys and values of a tool (or a resumed run) against the experiment's config.
        try:
            config_lib.apply(config_lib.load_experiment(namespace.experiment), cli.overrides(namespace))
        except config_lib.ConfigError as e:
            pytest.fail(f"{command}\n{e}")
