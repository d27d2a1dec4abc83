"""The advface gRPC API (``proto/advface/v1/advface.proto``): generated message and stub code.

``advface.api.v1`` holds the code ``scripts/gen_proto.sh`` generates with grpcio-tools; it is checked in. Importing
it needs ``protobuf`` (messages) and ``grpcio`` (stubs); the rest of advface does not import it.
"""
