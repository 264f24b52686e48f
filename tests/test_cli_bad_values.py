"""Bad values for every option of every CLI, derived from the types the parsers declare.

Each CLI exposes ``build_parser()``; every option that takes a value declares a type of
:mod:`hra_diffusion.cli` (or ``choices``). For each option the bad values of its type
(negative, zero, NaN, infinite, huge, past a bound; a missing path, a file where a folder
is expected and the reverse; blank text) are passed to the CLI's ``main`` in process. Each
must be refused at parse time, before any model loads: exit status 2, one line on stderr
naming the option, no traceback, and nothing on disk changed.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from benchmark_scripts import BENCHMARKS, load_benchmark

from hra_diffusion import cli
from hra_diffusion.errors import InputError

CLI_MODULES = (
    "hra_diffusion.train.train_dreambooth_hra",
    "hra_diffusion.train.train_dreambooth_hra_sdxl",
    "hra_diffusion.train.train_dreambooth_hra_sd3",
    "hra_diffusion.train.train_dreambooth_hra_flux",
    "hra_diffusion.train.train_control_hra",
    "hra_diffusion.train.pretrain_world",
    "hra_diffusion.train.make_world_dataset",
    "hra_diffusion.train.train_world_evaluators",
    "hra_diffusion.pipelines.generate",
    "hra_diffusion.pipelines.sample_control",
    "hra_diffusion.pipelines.export",
    "hra_diffusion.eval.evaluate_dreambooth",
    "hra_diffusion.eval.evaluate_control",
    "hra_diffusion.eval.compare_runs",
    "hra_diffusion.eval.evaluate_world",
    "hra_diffusion.eval.evaluate_world_evaluators",
    "hra_diffusion.eval.world_caption_accuracy",
    "hra_diffusion.eval.validate_identity",
    "benchmarks/control_world",
    "benchmarks/dreambooth_world",
    "benchmarks/method_world",
    "benchmarks/hra_step_size",
    "benchmarks/vae_round_trip",
)
"""Every user-facing CLI; ``benchmarks/<name>`` are scripts outside the package."""


def load_cli(name: str) -> ModuleType:
    """The module of a CLI named as in :data:`CLI_MODULES`."""
    if name.startswith("benchmarks/"):
        return load_benchmark(name.removeprefix("benchmarks/"))
    return importlib.import_module(name)


def options(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator:
    """(argv prefix, action) for every action that takes a value, sub-commands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options(sub, (*prefix, name))
        elif action.nargs != 0 and not isinstance(action, argparse._HelpAction):
            yield prefix, action


def cli_options() -> list[tuple[str, tuple[str, ...], str]]:
    """(CLI, argv prefix, option string or positional dest) of every option of every CLI."""
    found = []
    for name in CLI_MODULES:
        for prefix, action in options(load_cli(name).build_parser()):
            flag = action.option_strings[0] if action.option_strings else action.dest
            found.append((name, prefix, flag))
    return found


def find_action(name: str, prefix: tuple[str, ...], flag: str) -> argparse.Action:
    """The action of ``flag`` in the CLI's parser (under the sub-command ``prefix``)."""
    for found_prefix, action in options(load_cli(name).build_parser()):
        names = action.option_strings or [action.dest]
        if found_prefix == prefix and flag in names:
            return action
    raise LookupError(flag)


class Places:
    """Paths of each kind, in a folder whose content must not change."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = root / "a_file.txt"
        self.file.write_text("a file\n")
        self.folder = root / "a_folder"
        self.folder.mkdir()
        (self.folder / "inside.txt").write_text("inside\n")
        self.missing = root / "missing" / "nothing.safetensors"
        self.under_file = self.file / "below.png"


Values = Callable[[Places], list[str]]

NUMBERS: dict[Callable, list[str]] = {
    cli.positive_int: ["0", "-3", "nan", "2.5"],
    cli.non_negative_int: ["-1", "nan", "1.5"],
    cli.seed: ["-1", "nan", str(2**40)],
    cli.positive_float: ["0", "-1e-4", "nan", "inf"],
    cli.non_negative_float: ["-1", "nan", "inf"],
    cli.probability: ["-0.1", "1.5", "nan"],
    cli.open_unit: ["0", "1", "nan"],
    cli.below_one: ["-0.1", "1", "nan"],
    cli.image_side: ["0", "-8", "60", "100000", "nan"],
    cli.str_to_bool: ["maybe"],
    cli.text: ["", "   "],
}
"""Bad values of each number (and text) type."""

PATHS: dict[Callable, Values] = {
    cli.existing_file: lambda p: [str(p.missing), str(p.folder)],
    cli.existing_dir: lambda p: [str(p.missing), str(p.file)],
    cli.existing_path: lambda p: [str(p.missing)],
    cli.output_file: lambda p: [str(p.folder), str(p.under_file)],
    cli.output_dir: lambda p: [str(p.file), str(p.under_file)],
    cli.output_path: lambda p: [str(p.under_file)],
    cli.model_ref: lambda p: [str(p.missing), str(p.file), str(p.folder)],
    cli.model_or_checkpoint: lambda p: [str(p.missing), str(p.file), str(p.folder)],
    cli.pipeline_dir: lambda p: [str(p.missing), str(p.file), str(p.folder)],
    cli.component_ref: lambda p: [str(p.missing), "   "],
    cli.checkpoint_ref: lambda p: [str(p.missing), str(p.file)],
}
"""Bad values of each path type: missing, or of the other kind."""


def bad_values(action: argparse.Action, places: Places) -> list[str]:
    """The bad values of ``action``'s declared type; fails for an undeclared type."""
    kind = action.type
    if kind in NUMBERS:
        return NUMBERS[kind]
    if kind in PATHS:
        return PATHS[kind](places)
    if hasattr(kind, "bounds"):
        low, high = kind.bounds
        return [f"{low - 1:g}", f"{high + 1:g}", "nan"]
    if kind is None and action.choices is not None:
        return ["not-a-choice"]
    raise AssertionError(f"{action.option_strings or action.dest}: declare a type of cli")


def hashes(root: Path) -> dict[Path, str]:
    return {
        path: hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        for path in root.rglob("*")
    }


def refusal_line(err: str) -> str:
    """The one line a refusal printed (progress bars aside)."""
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1, err
    return lines[0]


OPTIONS = cli_options()


def test_every_cli_is_covered():
    """Every CLI has options here and each is refused by at least one derived value; every
    script module of the package is in :data:`CLI_MODULES` (found as the start-up benchmark
    finds them), so a new command line cannot be left out."""
    package_clis = {name for name in CLI_MODULES if not name.startswith("benchmarks/")}
    assert package_clis == set(load_benchmark("bench_startup").script_modules())
    benchmark_clis = {  # the hardware benchmarks (bench_*.py) keep plain argparse
        f"benchmarks/{path.stem}"
        for path in BENCHMARKS.glob("*.py")
        if "cli.ArgumentParser(" in path.read_text()
    }
    assert benchmark_clis == set(CLI_MODULES) - package_clis
    per_cli = {name: sum(o[0] == name for o in OPTIONS) for name in CLI_MODULES}
    assert all(per_cli.values()), per_cli
    assert len(OPTIONS) > 300


@pytest.mark.parametrize(
    ("name", "prefix", "flag"), OPTIONS, ids=[f"{n.split('.')[-1]}:{f}" for n, _, f in OPTIONS]
)
def test_bad_value_is_refused_at_parse_time(
    name: str,
    prefix: tuple[str, ...],
    flag: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    places = Places(tmp_path)
    monkeypatch.chdir(tmp_path)
    action = find_action(name, prefix, flag)
    main = load_cli(name).main
    before = hashes(tmp_path)
    for value in bad_values(action, places):
        argv = [*prefix, value] if not action.option_strings else [*prefix, f"{flag}={value}"]
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2, (argv, err)
        assert "Traceback" not in err, err
        line = refusal_line(err)
        names = "/".join(action.option_strings) or action.dest
        assert f": error: argument {names}: " in line, (argv, line)
        message = line[line.index("error: ") :]  # the program name is the runner's here
        assert len(message.replace(value, "")) <= 200, line
    assert hashes(tmp_path) == before


# --------------------------------------------------------------------------- the guard


def guarded(error: BaseException, sizes: str = "--resolution") -> Callable:
    """A CLI ``main`` whose work raises ``error``."""

    @cli.cli_main(sizes)
    def main(argv: list[str] | None = None) -> None:
        raise error

    return main


@pytest.mark.parametrize(
    ("error", "status", "fragment"),
    [
        (InputError("--weights x.safetensors is a pickle; save it again."), 2, "is a pickle"),
        (FileNotFoundError("No HRA weights at out/: the path does not exist."), 2, "does not"),
        (MemoryError(), 1, "out of memory: lower --resolution"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"), 1, "lower"),
        (torch.OutOfMemoryError("CUDA out of memory."), 1, "out of memory: lower --resolution"),
        (OSError(errno.ENOSPC, "No space left on device", "out/x.png"), 1, "disk is full"),
    ],
)
def test_expected_failures_end_in_one_line(
    error: BaseException, status: int, fragment: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as info:
        guarded(error)([])
    err = capsys.readouterr().err
    assert info.value.code == status
    line = refusal_line(err)
    assert ": error: " in line and fragment in line and "Traceback" not in err, err


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug"), KeyError("x")])
def test_unexpected_exceptions_keep_their_traceback(error: BaseException) -> None:
    with pytest.raises(type(error)):
        guarded(error)([])


def test_nested_guards_print_once(capsys: pytest.CaptureFixture) -> None:
    """A benchmark calling a training CLI's ``main`` prints the refusal once."""
    inner = guarded(InputError("--hra_r differs"))
    outer = cli.cli_main()(lambda argv=None: inner(argv))
    with pytest.raises(SystemExit) as info:
        outer([])
    assert info.value.code == 2
    assert refusal_line(capsys.readouterr().err).endswith("--hra_r differs")


def test_console_entry_point_exits_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    main = cli.cli_main()(lambda argv=None: seen.append(argv) or Path("returned"))
    assert main.console() == 0 and seen == [None]


def test_console_scripts_run_guarded_mains() -> None:
    """Every ``[project.scripts]`` entry is the console entry of a CLI tested above."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    assert len(scripts) >= 12
    for target in scripts.values():
        module, attr = target.split(":")
        assert attr == "main.console" and module in CLI_MODULES, target
        assert callable(load_cli(module).main.console), target


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports_and_builds_its_parser(script: str):
    """A script no other test runs still imports and answers --help (one broke unnoticed)."""
    module = load_benchmark(script)
    if hasattr(module, "build_parser"):
        with pytest.raises(SystemExit) as done:
            module.build_parser().parse_args(["--help"])
        assert done.value.code == 0
