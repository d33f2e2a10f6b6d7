"""Build hook: generate the gRPC stubs (scripts/gen_protos.py) before the packages are collected, so every wheel
and editable install carries them; everything else about the build is in pyproject.toml."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _generate_stubs() -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate()


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        _generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
