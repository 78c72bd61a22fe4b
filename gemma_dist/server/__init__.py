"""gRPC lives here: the gateway, request validation, and the generated stubs' upkeep.

The stubs (gemma_dist/v1/*_pb2*.py) are generated at build/install time; in a source checkout
they are (re)generated on first import when missing or older than protos/.
"""

from gemma_dist.server import codegen as _codegen

if (_codegen.ROOT / "protos").is_dir() and _codegen.is_stale():
    _codegen.generate()
