"""The advface gRPC sidecar: the ``advface.v1.AdvFace`` servicer (:mod:`server.servicer`), token auth
(:mod:`server.interceptors`), structured logs (:mod:`server.logs`) and the server itself (:mod:`server.app`:
health, reflection, TLS, message-size limits, graceful shutdown). Started by ``advface serve``."""
