"""Generators of small real test inputs: GeoTIFFs with a real CRS, JPEG corpora, broken and odd inputs."""
