"""The pipeline's stages, one folder each, in data order (README: Where the code lives)."""

from pathlib import Path

# The checkout (or the installed tree): configs/, data/sample/ and pyproject.toml live here.
REPO_ROOT = Path(__file__).resolve().parent.parent
