"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``) and ``grpc.health.v1``.

``oip.proto`` is the service; ``oip_pb2`` is generated from it (see the proto for how). ``codec`` turns
its messages into the HTTP path's decoded request and back; ``service`` serves them over the same flow.
"""
