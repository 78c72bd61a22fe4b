"""Generate the Python gRPC stubs from protos/ (run at build/install time, and on demand).

Outputs `gemma_dist/v1/gemma_pb2.py`, `gemma_pb2.pyi` and `gemma_pb2_grpc.py` (git-ignored),
matching the proto package `gemma_dist.v1`. The generator is the pinned grpcio-tools, so the
stubs are reproducible. Standalone on purpose (no gemma_dist imports): setup.py runs it
before the package exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository / source root
PROTO = Path("gemma_dist") / "v1" / "gemma.proto"


def generate(root: Path = ROOT) -> Path:
    """Run protoc on protos/gemma_dist/v1/gemma.proto into root/gemma_dist/v1/; returns that folder."""
    from grpc_tools import protoc
    import grpc_tools

    protos = root / "protos"
    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    out = root / "gemma_dist" / "v1"
    out.mkdir(parents=True, exist_ok=True)
    (out / "__init__.py").write_text('"""Generated gRPC stubs of gemma_dist.v1 (see protos/)."""\n')
    code = protoc.main(["grpc_tools.protoc", f"-I{protos}", f"-I{include}", f"--python_out={root}",
                        f"--pyi_out={root}", f"--grpc_python_out={root}", str(protos / PROTO)])
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}) on {protos / PROTO}")
    return out


def is_stale(root: Path = ROOT) -> bool:
    """True when the stubs are missing or older than the proto."""
    stub = root / "gemma_dist" / "v1" / "gemma_pb2.py"
    proto = root / "protos" / PROTO
    return not stub.exists() or (proto.exists() and proto.stat().st_mtime > stub.stat().st_mtime)


if __name__ == "__main__":
    print(generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
