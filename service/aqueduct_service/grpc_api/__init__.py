"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``) and ``grpc.health.v1``.

``oip.proto`` holds the messages; ``oip_pb2`` is generated from it (see the proto for how). ``http2``
serves gRPC calls over HTTP/2 in the front end's event loop; ``codec`` turns the messages into the HTTP
path's decoded request and back; ``service`` answers the methods over the same flow.
"""
