"""Generate the Python gRPC code (moco_retrieval/api/v1/retrieval_pb2*.py[i]) from proto/ with grpcio-tools.

protoc names the modules after the proto package (retrieval.v1) and imports them as `retrieval.v1`;
they are placed under the project's own namespace, moco_retrieval.api.v1, with that import rewritten.
The wire names (package retrieval.v1, service Retrieval) are unchanged.
Run `make proto` after editing proto/; tests/moco_retrieval/test_proto.py fails when the generated code is stale.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PROTO_FILES = ["retrieval/v1/retrieval.proto"]
PACKAGE = Path("moco_retrieval") / "api"
GENERATED_IMPORT, PROJECT_IMPORT = "from retrieval.v1 import", "from moco_retrieval.api.v1 import"


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules under out_dir/moco_retrieval/api/v1/ and return them."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *PROTO_FILES,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        target = out_dir / PACKAGE / "v1"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((Path(raw) / "retrieval" / "v1").iterdir()):
            (target / source.name).write_text(source.read_text().replace(GENERATED_IMPORT, PROJECT_IMPORT))
    for package in (out_dir / PACKAGE, target):
        (package / "__init__.py").write_text('"""Generated from proto/ by scripts/gen_proto.py; do not edit."""\n')
    return sorted(p for p in (out_dir / PACKAGE).rglob("*") if p.suffix in (".py", ".pyi"))


def main() -> int:
    for path in generate(REPO):
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
