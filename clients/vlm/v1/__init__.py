"""vlm.v1: messages (vlm_service_pb2) and the service stub (vlm_service_pb2_grpc), generated in the build."""
