"""Compile ``models/kernels.py`` (Cython's pure-Python mode) into ``models/_kernels_native``.

    .venv/bin/python deploy/build_native.py [--check]

Run by ``deploy/install.sh`` unless the compiled module was built from the source as it is now. The compiled
module records the digest of the source it was built from; ``models.kernels`` uses it only while
that digest matches (an edited source runs as plain Python until the next build, never stale C).
Needs a C compiler and Cython; without them leadstream runs the same code as plain Python, slower.
``--check``: exit 1 unless the compiled module is built and up to date.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "models" / "kernels.py"
NAME = "_kernels_native"


def target() -> Path:
    return ROOT / "models" / (NAME + sysconfig.get_config_var("EXT_SUFFIX"))


def build() -> Path:
    """Compile the kernels into ``models/``; returns the module's path."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    sys.path.insert(0, str(ROOT))
    from models.kernels import source_digest

    with tempfile.TemporaryDirectory() as tmp:
        # Same source under the compiled module's name, with the digest it is built from.
        copy = Path(tmp) / "models" / (NAME + ".py")
        copy.parent.mkdir()
        copy.write_text(SOURCE.read_text() + f"\nSOURCE_DIGEST = {source_digest(SOURCE)!r}\n")
        # -ffp-contract=off: a * v + b stays a multiply then an add (no fused multiply-add), as in Python.
        ext = Extension(f"models.{NAME}", [str(copy)], extra_compile_args=["-O2", "-ffp-contract=off"])
        modules = cythonize([ext], compiler_directives={"language_level": 3}, quiet=True,
                            build_dir=str(Path(tmp) / "c"))
        dist = Distribution({"ext_modules": modules, "script_name": "build_native.py"})
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib, cmd.build_temp = str(Path(tmp) / "lib"), str(Path(tmp) / "tmp")
        dist.run_command("build_ext")
        built = next((Path(tmp) / "lib" / "models").glob(NAME + "*"))
        # A new file, renamed over the old one: a process that loaded the old one (this one, through
        # models.kernels) keeps its mapping intact instead of reading a file rewritten in place.
        staged = target().with_suffix(".tmp")
        shutil.copyfile(built, staged)
        os.replace(staged, target())
    return target()


def up_to_date() -> bool:
    """Whether the compiled module exists and was built from the source as it is now."""
    sys.path.insert(0, str(ROOT))
    from models import kernels

    return kernels._native() is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 unless the compiled module is up to date")
    args = parser.parse_args()
    if args.check:
        return 0 if up_to_date() else 1
    print(f"build_native: {build().relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
