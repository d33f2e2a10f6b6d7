"""Build hook: generate the grym.v1 stubs from the repository's proto/ before the packages are collected (the
same generator as the server's wheel, scripts/gen_protos.py, asked for the client's copy only)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def _generate_stubs() -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate({"grym.v1": HERE / "grym" / "v1"})


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        _generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
