"""The inference service: reads a bundle from models/<name>/ and serves POST /predict."""
