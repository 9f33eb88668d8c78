"""The model store: checkpoint files on disk (discovery, hashes, architecture detection, LDM conversion, the
shipped configs), loading them offline, VAE files, and the model manager that owns every loaded model and the
pipelines built over it. Imports only the core."""
