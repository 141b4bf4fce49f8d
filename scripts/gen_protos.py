"""Regenerate relay_proto/ from protos/ (the only way relay_proto/ is ever written).

Usage: python scripts/gen_protos.py [--check]

--check regenerates into a temporary folder and exits 1 if the committed code differs.
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = ROOT / "relay_proto"
HEADER = '"""Generated from protos/ by scripts/gen_protos.py. Do not edit."""\n'


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    sources = sorted(PROTOS.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    staging = out / "_staging"
    staging.mkdir(parents=True)
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={staging}",
        f"--pyi_out={staging}",
        f"--grpc_python_out={staging}",
        *map(str, sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(staging.rglob("*.py*")):
        # Flatten stowhook/relay/v1/relay_pb2.py into relay_proto/relay_pb2.py and make
        # the generated grpc module import its sibling relatively.
        text = path.read_text()
        text = text.replace(
            "from stowhook.relay.v1 import relay_pb2 as", "from relay_proto import relay_pb2 as"
        )
        target = out / path.name
        target.write_text(text)
        written.append(target)
    (out / "__init__.py").write_text(HEADER)
    shutil.rmtree(staging)
    return [*written, out / "__init__.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if relay_proto/ is stale")
    options = parser.parse_args()
    if not options.check:
        for old in PACKAGE.glob("*.py*"):
            old.unlink()
        PACKAGE.mkdir(exist_ok=True)
        generate(PACKAGE)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = pathlib.Path(tmp) / "relay_proto"
        fresh.mkdir()
        names = [p.name for p in generate(fresh)]
        committed = sorted(p.name for p in PACKAGE.glob("*.py*"))
        _, mismatch, errors = filecmp.cmpfiles(fresh, PACKAGE, names, shallow=False)
        stale = sorted(set(mismatch) | set(errors) | (set(committed) ^ set(names)))
    if stale:
        print(f"relay_proto/ is stale ({', '.join(stale)}): run python scripts/gen_protos.py")
        return 1
    print("relay_proto/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
