"""dropcli: dropout for trained models (inject, uncertainty, prune)."""

__version__ = "0.1.0"
