"""Generate the Python gRPC code (retrieval/v1/retrieval_pb2*.py) from proto/ with grpcio-tools.

Run `make proto` after editing proto/; tests/test_proto.py fails when the generated code is stale.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PROTO_FILES = ["retrieval/v1/retrieval.proto"]


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules under out_dir (mirroring the proto package) and return them."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTO_FILES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    for package in (out_dir / "retrieval", out_dir / "retrieval" / "v1"):
        (package / "__init__.py").write_text('"""Generated from proto/ by scripts/gen_proto.py; do not edit."""\n')
    return sorted(p for p in (out_dir / "retrieval").rglob("*") if p.suffix in (".py", ".pyi"))


def main() -> int:
    for path in generate(REPO):
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
