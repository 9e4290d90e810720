"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``) and ``grpc.health.v1``.

``oip.proto`` is the service; ``oip_pb2`` is generated from it (see the proto for how). ``codec`` turns
its messages into the HTTP path's decoded request and back; ``service`` serves them over the same flow.
"""

import os

# The flow forks its workers (and restarts them) from this process while gRPC's threads run. Workers
# never use gRPC, so gRPC core's fork handlers are not needed; with them on it prints a line to stderr at
# every fork, outside the pod's JSON log. Set before grpc is first imported (its submodules import it).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
