"""Models built or converted once into zoflat's cache (`<cache>/models/<name>`), then reused."""

import os
import shutil
import tempfile
from pathlib import Path

from zoflat_cli.env import cache_dir
from zoflat_cli.errors import ZoflatError


def cached_folder(name: str, build) -> Path:
    """<cache>/models/<name>, made by build(scratch folder) the first time: built aside and renamed into
    place (atomic: a concurrent builder's copy wins, and a build cut short leaves no half folder)."""
    folder = cache_dir() / "models" / name
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=folder.parent))
        try:
            build(scratch)
            if not (scratch / "config.json").is_file():  # never cache a folder without its model
                raise ZoflatError(f"building the model {name} wrote no config.json into {scratch}")
            os.rename(scratch, folder)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            if not (folder / "config.json").is_file():
                raise
    return folder
