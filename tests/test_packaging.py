"""Packaging: docs/configuration.md is in sync, and conf/ and the native kernel work from a non-editable wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from clt_forge.config.reference import render

REPO = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_up_to_date():
    on_disk = (REPO / "docs" / "configuration.md").read_text()
    assert on_disk == render(), "regenerate: python -m clt_forge.config.reference > docs/configuration.md"


@pytest.mark.slow
def test_wheel_install_composes_configs(tmp_path):
    """Build the wheel, install it (no deps) in a scratch venv that borrows this venv's
    dependencies, and compose a config from outside the repository."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("clt_forge-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # Dependencies come from this venv; an editable clt_forge there is NOT visible (its .pth
    # hooks only run for real site dirs), so the import below must come from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import clt_forge.config.compose as c; print(c.conf_dir())"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site)
    result = subprocess.run(
        [str(venv / "bin" / "clt"), "cache", "--cfg", "job", "quant=int4"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "scheme: int4" in result.stdout
    assert not (tmp_path / "conf").exists()
    built = subprocess.run(  # the native kernel's C source ships in the wheel and builds from there
        [str(venv / "bin" / "python"), "-c", "from clt_forge.clt import native as n; print(n.SOURCE, n.unavailable())"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "CLT_FORGE_CACHE": str(tmp_path / "cache")},
        check=True,
    )
    source, failure = built.stdout.split()
    assert Path(source).is_relative_to(site) and failure == "None", built.stdout
    assert list((tmp_path / "cache" / "native").glob("sparse_kernels-*.so"))
