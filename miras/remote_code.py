"""The model's code saved beside its weights, so a folder loads without miras (`trust_remote_code=True`).

transformers loads custom code from flat files in the model folder: `auto_map` in config.json names
`configuration_moneta.MonetaConfig` and `modeling_moneta.MonetaForCausalLM`, and transformers copies
each file that these import relatively (`from .x import y` means `x.py` beside them). miras is a
package with a subpackage (miras.memory), so the files are written flattened: each module that
miras.modeling needs, found by following its relative imports, becomes one file with a flat name and
its relative imports rewritten to those names. Nothing else changes, so the code that runs is the
code miras runs, and the logits are the same.

A folder loaded this way and saved again gets its code from transformers itself (custom_object_save
copies the dynamic module's files); a folder saved by miras gets it from `write_model_code`.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from pathlib import Path

ROOT_MODULE = "miras.modeling"
# Flat names for the two files that auto_map points to; every other module is moneta_<path>.
ENTRY_FILES = {"miras.configuration": "configuration_moneta", "miras.modeling": "modeling_moneta"}
# Imported at the top of a module that only an optional path loads (the fused Triton kernels): transformers
# would refuse to load the model where the package is missing, so the saved copy imports it in a try block.
OPTIONAL_PACKAGES = {"triton"}
AUTO_MAP = {
    "AutoConfig": "configuration_moneta.MonetaConfig",
    "AutoModel": "modeling_moneta.MonetaModel",
    "AutoModelForCausalLM": "modeling_moneta.MonetaForCausalLM",
}


class RemoteCodeError(RuntimeError):
    """The modeling code cannot be flattened (a relative import outside miras, or `from . import x`)."""


def flat_name(module: str) -> str:
    """miras.memory.rule -> moneta_memory_rule; miras.memory (a package) -> moneta_memory."""
    if module in ENTRY_FILES:
        return ENTRY_FILES[module]
    return "moneta_" + module.removeprefix("miras.").replace(".", "_")


def _source_path(module: str) -> Path:
    package_root = Path(__file__).resolve().parent
    parts = module.split(".")[1:]
    path = package_root.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _is_package(module: str) -> bool:
    return _source_path(module).name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute name a relative `from .x import y` in `module` refers to."""
    package = module if _is_package(module) else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    if not node.module:
        raise RemoteCodeError(f"{module}: 'from {'.' * node.level} import ...' cannot be flattened; name the module")
    target = f"{package}.{node.module}"
    if not target.startswith("miras."):
        raise RemoteCodeError(f"{module}: relative import of {target!r} leaves the miras package")
    return target


def _top_modules(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    return {node.module.split(".")[0]} if node.level == 0 and node.module else set()


def _optional(statement: str) -> str:
    """A top-level import wrapped in try/except: transformers (check_imports) then does not require the package."""
    body = "".join(f"    {line}\n" for line in statement.rstrip("\n").splitlines())
    return f"try:\n{body}except ImportError:  # optional: only the path that needs it imports this module\n    pass\n"


def flattened_sources(root: str = ROOT_MODULE) -> dict[str, str]:
    """{file name: source} for `root` and every module it imports relatively, imports rewritten to flat names.

    Read and parsed once per process, the first time it is asked for (the Checkpointer asks when it is
    made, on the main thread): a checkpoint's code is then the code this process imported, and the
    background thread that writes checkpoints never runs ast.parse, which, while the training thread ran,
    failed a save with CPython's "AST constructor recursion depth mismatch".
    """
    return dict(_flattened(root))


@functools.cache
def _flattened(root: str) -> tuple[tuple[str, str], ...]:
    sources: dict[str, str] = {}
    pending = [root]
    while pending:
        module = pending.pop()
        name = flat_name(module)
        if f"{name}.py" in sources:
            continue
        text = _source_path(module).read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = _absolute(module, node)
                pending.append(target)
                row = node.lineno - 1
                pattern = r"from\s+\.+" + re.escape(node.module) + r"(?=\s+import)"
                lines[row], count = re.subn(pattern, f"from .{flat_name(target)}", lines[row], count=1)
                if not count:
                    raise RemoteCodeError(f"{module}: cannot rewrite line {node.lineno}: {lines[row].strip()!r}")
        for node in ast.parse(text).body:  # optional packages: imported where present, never required to load
            if isinstance(node, (ast.Import, ast.ImportFrom)) and _top_modules(node) & OPTIONAL_PACKAGES:
                first, last = node.lineno - 1, node.end_lineno
                lines[first:last] = [_optional("".join(lines[first:last]))] + [""] * (last - first - 1)
        sources[f"{name}.py"] = "".join(lines)
    return tuple(sources.items())


def write_model_code(folder: str | Path) -> list[str]:
    """Write the flattened modeling code into a saved model folder and `auto_map` into its config.json.

    Returns the file names written. Inside a copy loaded as remote code (not the miras package) it
    does nothing: transformers saves the code of dynamic modules itself.
    """
    if __package__ != "miras":
        return []
    folder = Path(folder)
    written = []
    for name, text in flattened_sources().items():
        (folder / name).write_text(text, encoding="utf-8")
        written.append(name)
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("auto_map") != AUTO_MAP:
            config["auto_map"] = AUTO_MAP
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return sorted(written)
