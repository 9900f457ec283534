"""The package version, in one place: ``vae_toolkit.__version__`` and the store's metadata read it here."""

__version__ = "0.2.0"
