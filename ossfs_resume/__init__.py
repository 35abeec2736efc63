"""ossfs-resume: mount an OSS or S3-compatible bucket read-only, with a resumable part cache."""

__version__ = "0.1.0"

from .download import resumable_download

__all__ = ["__version__", "resumable_download"]
