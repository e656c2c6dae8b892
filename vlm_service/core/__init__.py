"""The serving core: the engine (models' lifecycle), admission, the per-model scheduler thread,
jobs (one request's events) and text assembly. No protobuf, no grpc.
"""
