"""`stages/` installs as `batctl.stages` from a wheel and from the editable install (DESIGN §2)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import batctl

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_maps_stages_into_the_package():
    import batctl.stages.score as score

    assert Path(score.__file__).resolve() == REPO / "stages" / "score.py"
    assert Path(batctl.__file__).resolve().parent == REPO / "batctl"


def test_wheel_ships_batctl_stages_and_no_top_level_stages(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("batctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "batctl/stages/score.py" in names and "batctl/stages/__init__.py" in names
    assert not any(n.startswith("stages/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "batctl = batctl.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_pip_install_dot_runs_from_site_packages(tmp_path):
    # A real, non-editable `pip install .` into its own directory, which then shadows the checkout.
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    code = "import batctl.stages.score as s, batctl.cli; print(s.__file__)"
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    where = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert where.stdout.strip() == str(target / "batctl" / "stages" / "score.py")
    version = subprocess.run(
        [target / "bin" / "batctl", "--version"], capture_output=True, text=True, env=env
    )
    assert version.returncode == 0 and version.stdout.startswith("batctl ")
