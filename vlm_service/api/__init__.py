"""The gRPC edge: the servicer, Watch, protobuf conversion, auth, status codes and interceptors.

The only layer that imports protobuf or grpc types; it calls into :mod:`vlm_service.core`.
"""
