"""Registers the "moneta" model type with transformers' Auto classes, without importing transformers at
`import miras`.

Importing transformers' Auto classes costs seconds (torch, modeling_utils) that `import miras`, `miras
--help` and the storage plugins should not pay. So `import miras` only puts a finder on sys.meta_path:
it wraps the loader of every transformers module imported from then on, and once the outermost such
import has finished (no transformers module half-initialised, so miras.modeling can import what it needs)
it registers MonetaConfig with AutoConfig if transformers' configuration_auto is loaded, and
MonetaForCausalLM with AutoModelForCausalLM if modeling_auto is. When both are registered the finder
leaves. Auto classes imported before miras are registered at `import miras`.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

CONFIG_MODULE = "transformers.models.auto.configuration_auto"
MODEL_MODULE = "transformers.models.auto.modeling_auto"
_registered: set[str] = set()
_state = {"depth": 0, "busy": False}
_executing: set[str] = set()  # miras.configuration / miras.modeling while their code runs


def _initialising(name: str) -> bool:
    return name in _executing


def register_loaded() -> None:
    """Register with whichever of the two Auto modules is loaded (at once, and again after each import)."""
    if _state["busy"] or _state["depth"] or len(_registered) == 2:
        return
    _state["busy"] = True
    try:
        if "config" not in _registered and CONFIG_MODULE in sys.modules and not _initialising("miras.configuration"):
            from .configuration import MonetaConfig

            sys.modules[CONFIG_MODULE].AutoConfig.register(MonetaConfig.model_type, MonetaConfig, exist_ok=True)
            _registered.add("config")
        if "model" not in _registered and MODEL_MODULE in sys.modules and not _initialising("miras.modeling"):
            from .configuration import MonetaConfig
            from .modeling import MonetaForCausalLM

            sys.modules[MODEL_MODULE].AutoModelForCausalLM.register(MonetaConfig, MonetaForCausalLM, exist_ok=True)
            _registered.add("model")
    except Exception as error:  # never break the user's own import; say why the Auto classes lack "moneta"
        _registered.update(("config", "model"))
        warnings.warn(f"miras could not register 'moneta' with transformers' Auto classes: {error}", stacklevel=2)
    finally:
        _state["busy"] = False
    if len(_registered) == 2 and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


class _CountingLoader(importlib.abc.Loader):
    """The module's own loader, counting how many transformers modules are being executed, then registering
    once none is."""

    def __init__(self, loader: importlib.abc.Loader, counted: bool):
        self.loader = loader
        self.counted = counted

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        _state["depth"] += self.counted
        if not self.counted:
            _executing.add(module.__name__)
        try:
            self.loader.exec_module(module)
        finally:
            _state["depth"] -= self.counted
            _executing.discard(module.__name__)
        register_loaded()

    def __getattr__(self, name):  # get_resource_reader, is_package, get_source, ... of the real loader
        return getattr(self.loader, name)


class _TransformersFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        # transformers' modules, and the two of miras that register (the Auto modules may load while they do)
        counted = name == "transformers" or name.startswith("transformers.")
        if not counted and name not in ("miras.configuration", "miras.modeling"):
            return None
        for finder in sys.meta_path:  # whichever finder would have found it (a path, an editable install)
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CountingLoader(spec.loader, counted)
                return spec
        return None


_FINDER = _TransformersFinder()


def install() -> None:
    """Register now with the Auto modules already loaded, and when the others are imported."""
    register_loaded()
    if len(_registered) < 2 and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
