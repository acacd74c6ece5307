"""Regenerates the Python stubs of the `.proto` sources in this folder (needs grpcio-tools).

    python -m expertmesh.protos.build           # rewrite the checked-in stubs
A test regenerates them into a temporary folder and checks they equal the checked-in ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parents[1]  # so the stubs import each other as `expertmesh.protos.*`


def generate(out_dir: Path = ROOT) -> list[Path]:
    from grpc_tools import protoc  # build-time dependency, in the test extra

    written = []
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        rel = proto.relative_to(ROOT)
        args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(rel)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {rel}")
        stem = rel.with_suffix("")
        written += [out_dir / f"{stem}_pb2.py", out_dir / f"{stem}_pb2_grpc.py"]
    return written


if __name__ == "__main__":
    for path in generate():
        print(path)
    sys.exit(0)
