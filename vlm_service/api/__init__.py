"""The gRPC edge: the servicer, Watch, protobuf conversion, status codes and the interceptors.

The only layer that sees the service's protobuf messages (``vlm.v1``); below it, core and backends know
neither protobuf nor grpc. (observability's access line and tracing read a call's grpc status, and
server.py wires grpc up.)
"""
