"""Regenerate protos/*_pb2*.py from protos/*.proto (the only way they are made).

Run from anywhere: `python scripts/gen_protos.py`. `--check` exits non-zero
when the committed files differ from what protoc generates now.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


# protos/ installs as gradpool.protos, so protoc must see the files at that
# import path: then the generated gRPC module imports its sibling as
# `from gradpool.protos import gradpool_pb2`, whatever else is on sys.path.
PACKAGE_PATH = Path("gradpool") / "protos"


def generate(out_dir: Path) -> Path:
    """Generate into `out_dir`; returns the folder the modules landed in."""
    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / PACKAGE_PATH
        staged.mkdir(parents=True)
        protos = []
        for proto in sorted((ROOT / "protos").glob("*.proto")):
            shutil.copyfile(proto, staged / proto.name)
            protos.append(str(PACKAGE_PATH / proto.name))
        args = ["grpc_tools.protoc", f"-I{staging}", f"--python_out={out_dir}",
                f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}", *protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    return out_dir / PACKAGE_PATH


def stale_files() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = sorted(p for p in generate(Path(tmp)).iterdir() if p.name.endswith(GENERATED_SUFFIXES))
        return [p.name for p in fresh
                if not (ROOT / "protos" / p.name).exists()
                or not filecmp.cmp(p, ROOT / "protos" / p.name, shallow=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    if parser.parse_args().check:
        stale = stale_files()
        if stale:
            sys.exit(f"stale generated code: {', '.join(stale)}; run python scripts/gen_protos.py")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for module in generate(Path(tmp)).iterdir():
            if module.name.endswith(GENERATED_SUFFIXES):
                shutil.copyfile(module, ROOT / "protos" / module.name)


if __name__ == "__main__":
    main()
