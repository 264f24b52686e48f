"""A real install works: the wheel, installed outside the checkout, runs every command line.

The wheel is built from the checkout (``pip wheel --no-deps --no-build-isolation``) and
installed with ``pip install --no-deps --target`` into a temporary folder; the test's
dependencies (torch, diffusers, ...) come from the running environment. Every command runs
from a folder outside the checkout with that folder first on ``PYTHONPATH``, and each
process checks that ``hra_diffusion`` was imported from the install, so nothing can reach
into the checkout unnoticed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

from hra_diffusion.world.subjects import SUBJECTS, write_views

CHECKOUT = Path(__file__).resolve().parents[1]

EVERY_HELP = r"""
import contextlib, io, runpy, sys
from importlib.metadata import entry_points
from pathlib import Path
import hra_diffusion, hra_diffusion.eval, hra_diffusion.pipelines, hra_diffusion.train

site = Path(sys.argv[1]).resolve()
assert Path(hra_diffusion.__file__).resolve().is_relative_to(site), hra_diffusion.__file__


def help_of(run, argv):
    sys.argv = argv
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            run()
        except SystemExit as stop:
            assert stop.code in (0, None), (argv, stop.code)
    assert "usage:" in out.getvalue(), argv
    return argv[0]


ran = []
for package in (hra_diffusion.train, hra_diffusion.pipelines, hra_diffusion.eval):
    for path in sorted(Path(package.__path__[0]).glob("*.py")):
        if 'if __name__ == "__main__":' in path.read_text():
            module = f"{package.__name__}.{path.stem}"
            as_script = lambda: runpy.run_module(module, run_name="__main__")  # noqa: E731
            ran.append(help_of(as_script, [module, "--help"]))
for script in entry_points(group="console_scripts"):
    if script.dist is not None and script.dist.name == "hra-diffusion":
        ran.append(help_of(script.load(), [script.name, "--help"]))
print("\n".join(ran))
"""


def run(argv: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``argv`` from ``cwd`` with the install first on the import path; fail loudly."""
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the checkout, installed into a folder of its own."""
    wheels, site = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(CHECKOUT)]
    subprocess.run(build, check=True, capture_output=True)
    (wheel,) = wheels.glob("hra_diffusion-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    return site


def checkout_command_lines() -> set[str]:
    """The checkout's script modules (found as the start-up benchmark finds them) and the
    console scripts of its (editable) install."""
    modules = set(load_benchmark("bench_startup").script_modules())
    scripts = {
        script.name
        for script in entry_points(group="console_scripts")
        if script.dist is not None and script.dist.name == "hra-diffusion"
    }
    return modules | scripts


def test_every_command_line_answers_help_from_the_install(site: Path, tmp_path: Path) -> None:
    done = run([sys.executable, "-c", EVERY_HELP, str(site)], site, cwd=tmp_path)
    ran = done.stdout.split()
    assert "hra_diffusion.train.train_dreambooth_hra" in ran and "hra-generate" in ran
    assert sorted(ran) == sorted(checkout_command_lines())


def test_dreambooth_trains_from_the_install_with_the_bundled_recipe(
    site: Path, tmp_path: Path
) -> None:
    subject = tmp_path / "subject"
    write_views(SUBJECTS["robot"], subject)
    recipe = site / "hra_diffusion" / "world" / "dreambooth.args"
    argv = [sys.executable, "-m", "hra_diffusion.train.train_dreambooth_hra", f"@{recipe}"]
    argv += ["--instance_data_dir", str(subject), "--instance_prompt", "a qwe toy"]
    argv += ["--max_train_steps", "2", "--output_dir", str(tmp_path / "out")]
    run(argv, site, cwd=tmp_path)
    assert (tmp_path / "out" / "hra_weights.safetensors").is_file()
