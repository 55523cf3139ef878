"""The search service: an HTTP API and a web page over an index, on Ray Serve."""
