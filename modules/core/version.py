"""The project's version, written into infotexts and reported by the API."""
VERSION = "0.1.0"
