"""Ferry: the one installed namespace, and the client SDK at its top.

Layout: the repository keeps `common/`, `services/`, `kernels/` and `bench/` at its root;
they install as `ferry.common`, `ferry.services`, `ferry.kernels` and `ferry.bench`
(pyproject's `package-dir`). In a source checkout used without installing
(`PYTHONPATH=<repo>`, as on the GPU machines) `__path__` below also lists the repository
root, so the same names resolve there. An installed wheel holds the folders inside this
package and leaves `__path__` alone. The root folders have no `__init__.py` (namespace
portions), so with the repository root on `sys.path` they never shadow an installed
package of the same bare name (Hugging Face's `kernels`, which transformers imports).

The SDK (`from ferry import Client`) is imported on first use, so `import ferry.kernels`
or `import ferry.common.wire` does not load the client and its sockets.
"""

from pathlib import Path as _Path

_PACKAGE_DIR = _Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parent
if (not (_PACKAGE_DIR / "common").is_dir()
        and (_SOURCE_ROOT / "pyproject.toml").is_file()
        and (_SOURCE_ROOT / "common" / "wire.py").is_file()):
    __path__.append(str(_SOURCE_ROOT))  # noqa: F821 (a package's __path__)

_SDK_NAMES = {
    "AsyncClient": "ferry.client", "AsyncStream": "ferry.client", "Chunk": "ferry.client",
    "Client": "ferry.client", "Completion": "ferry.client", "Stream": "ferry.client",
    "FerryError": "ferry.errors", "BadRequest": "ferry.errors", "Unauthorized": "ferry.errors",
    "Overloaded": "ferry.errors", "Unavailable": "ferry.errors", "Timeout": "ferry.errors",
    "ServerError": "ferry.errors", "ConnectionLost": "ferry.errors",
}

__all__ = list(_SDK_NAMES)


def __getattr__(name: str):
    """The SDK's public names, imported when first asked for (PEP 562)."""
    module_name = _SDK_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'ferry' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
