"""The architecture holds: the engine's packages import downwards only, it never imports the
CLI, the API or Textual, and it keeps at most a dozen modules outside its packages."""

import ast
from pathlib import Path

from .conftest import ROOT

ENGINE = ROOT / "smi_engine"
#: Lower layers first; a module may import its own layer and the ones below (README's map).
LAYERS = [
    {"errors", "checks", "files", "lazy", "hookspecs", "plugins"},
    {"vit", "quantization"},
    {"models", "data"},
    {"pool", "calibration"},
    {"inversion", "runs", "runtime"},
    {"downstream"},
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_engine_packages_import_downwards_only():
    upward = []
    for path in ENGINE.rglob("*.py"):
        part = path.relative_to(ENGINE).parts[0].removesuffix(".py")
        if part == "__init__":  # the lazy import surface names everything, on first use
            continue
        for module in _imports(path):
            target = module.split(".")[1] if module.startswith("smi_engine.") else None
            if target is not None and target != part and LAYER[target] > LAYER[part]:
                upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert upward == []


def test_the_engine_never_imports_the_cli_the_api_or_a_ui():
    for path in ENGINE.rglob("*.py"):
        for module in _imports(path):
            assert module.split(".")[0] not in ("smi_cli", "smi", "textual", "typer"), (path, module)


def test_every_engine_module_belongs_to_a_layer_and_few_stay_flat():
    flat = [p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__"]
    packages = [p.name for p in ENGINE.iterdir() if (p / "__init__.py").is_file()]
    assert len(flat) <= 12 and set(flat) | set(packages) == set(LAYER)


def test_no_engine_function_but_a_constructor_takes_more_than_seven_parameters():
    """Issue 22's bound: a longer list is a config object waiting to be named."""
    long = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "__init__":
                arguments = node.args
                names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
                if len([n for n in names if n not in ("self", "cls")]) > 7:
                    long.append(f"{path.relative_to(ENGINE)}:{node.lineno} {node.name}")
    assert not long, long
