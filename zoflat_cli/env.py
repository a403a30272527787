"""The machine outside torch: the network to the model hub and zoflat's cache folder (devices and
memory are devices.py's). No torch here: the command line imports this at start-up."""

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")  # --dtype; devices.DTYPES maps them to torch

def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a server's port answers within `timeout` seconds (a quick check before a client's own
    minutes of retries)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme in ("https", "wss") else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    return reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def cache_dir() -> Path:
    if os.environ.get("ZOFLAT_DATA"):
        return Path(os.environ["ZOFLAT_DATA"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "zoflat"
