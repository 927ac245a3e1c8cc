"""Content-addressed blob store (placeholder: filled in by its own change)."""

from __future__ import annotations

from pathlib import Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
