"""Regenerate protos/*_pb2*.py from protos/*.proto (the only way they are made).

Run from anywhere: `python scripts/gen_protos.py`. `--check` exits non-zero
when the committed files differ from what protoc generates now.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos").glob("*.proto"))
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def stale_files() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = sorted(p for p in (Path(tmp) / "protos").iterdir() if p.name.endswith(GENERATED_SUFFIXES))
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
    import os
    os.chdir(ROOT)
    generate(ROOT)


if __name__ == "__main__":
    main()
