"""vlm-service: a gRPC microservice that streams what small vision-language models write."""

__version__ = "0.1.0"
