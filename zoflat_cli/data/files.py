"""Writing a folder of data files (`zoflat data sample`, `data kshot`) as one step."""

import os
import shutil
import tempfile
from pathlib import Path

from zoflat_cli.errors import ZoflatError


def write_new_folder(folder: Path, write, force: bool = False) -> Path:
    """write(tmp) fills a temporary sibling of `folder`, which then takes its place: a folder that
    already holds files is refused (replaced with force), and a failed write (a full disk) leaves
    neither a partial file nor a changed folder."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise ZoflatError(f"{folder} already holds files (edited by hand?); give --force to replace them, or "
                          f"another --out")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        if folder.is_dir():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
