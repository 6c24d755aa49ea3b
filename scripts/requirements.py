"""Print pyproject.toml's runtime dependencies (and those of the extras named
as arguments), one requirement a line: the Dockerfile installs these in a
layer of their own, before the sources are copied, so that a code change
does not reinstall numpy and grpcio.

    python scripts/requirements.py [pyproject.toml] [--extras demo,...]
"""

from __future__ import annotations

import argparse
import re
import sys

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    lines = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"requirements.py: no extra {extra!r} in pyproject.toml (have: {', '.join(optional)})")
        for requirement in optional[extra]:
            own = re.fullmatch(rf"{re.escape(project['name'])}\[([\w,\s-]+)\]", requirement.strip())
            if own:  # "gradpool[demo]" inside another extra
                lines += requirements(pyproject, [e.strip() for e in own.group(1).split(",")])
            else:
                lines.append(requirement)
    return list(dict.fromkeys(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", nargs="?", default="pyproject.toml")
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. demo")
    args = parser.parse_args()
    with open(args.pyproject, "rb") as f:
        pyproject = tomllib.load(f)
    extras = [e for e in args.extras.split(",") if e.strip()]
    print("\n".join(requirements(pyproject, [e.strip() for e in extras])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
