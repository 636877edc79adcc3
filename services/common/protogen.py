"""Generate the Python protobuf/gRPC code for `protos/spr/v1/*.proto` (one command, reproducible).

    spr-protogen          # regenerate in place
    spr-protogen --check  # exit 1 when the committed generated code is stale

Output goes next to the .proto files so that `spr.v1` is importable as a package;
`.pyi` stubs come from mypy-protobuf so that the core and services type-check.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
PACKAGE_DIR = Path("spr") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) over every proto; return the generated files."""
    from grpc_tools import protoc  # dev dependency: imported lazily

    protos = sorted(str(p.relative_to(proto_root)) for p in (proto_root / PACKAGE_DIR).glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    # mypy-protobuf's plugins live beside this interpreter, which need not be on PATH.
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in (out_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_files(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Names of generated files that differ from a fresh generation (or are missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp), proto_root)}
        committed = {
            p.name: p for p in (proto_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES)
        }
        names = sorted(set(fresh) | set(committed))
        return [
            n
            for n in names
            if n not in fresh or n not in committed or not filecmp.cmp(fresh[n], committed[n], shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if the generated code is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code (run `spr-protogen`):", ", ".join(stale), file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PROTO_ROOT / PACKAGE_DIR / path.name)
            print(f"wrote {PACKAGE_DIR / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
