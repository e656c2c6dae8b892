"""Model families, one module each, behind :class:`~vlm_service.backends.base.Backend`."""
