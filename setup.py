"""Packaging glue that pyproject.toml cannot express: a built package (a wheel, a
non-editable install) carries copies of the checkout's top-level data directories
(``firmware/``: the catalogue and expected incompatibilities; ``guests/``: image recipes and
the guest agent) under ``harness/_shipped/``, where :mod:`harness.paths` finds them.  An
editable install reads the top-level directories in place."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("firmware", "guests")


class BuildPyWithData(build_py):  # type: ignore[misc]
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        here = Path(__file__).resolve().parent
        for name in SHIPPED:
            dest = Path(self.build_lib) / "harness" / "_shipped" / name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(here / name, dest,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


setup(cmdclass={"build_py": BuildPyWithData})
