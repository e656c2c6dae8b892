"""Request images: decoding (checks, reduction, in niced processes) and the image cache."""
