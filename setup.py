"""Build hook: generate the gRPC stubs from protos/ before packaging (metadata is in pyproject.toml)."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    """build_py that first runs gemma_dist/server/codegen.py."""

    def run(self):
        root = Path(__file__).resolve().parent
        runpy.run_path(str(root / "gemma_dist" / "server" / "codegen.py"))["generate"](root)
        super().run()


# Also generate before setup(): package discovery runs first, and would miss gemma_dist.v1 in a
# clean checkout (a wheel built from it would lack the stubs).
runpy.run_path(str(Path(__file__).resolve().parent / "gemma_dist" / "server" / "codegen.py"))["generate"](
    Path(__file__).resolve().parent)
setup(cmdclass={"build_py": BuildPyWithProtos})
