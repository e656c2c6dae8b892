"""Generated gRPC stubs of the vlm-service contract (built from protos/vlm/; see clients/setup.py)."""
