"""The key service's gRPC API (``proto/advface/keyservice/v1/keyservice.proto``): generated code, checked in."""
