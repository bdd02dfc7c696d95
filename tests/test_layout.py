"""The package's layout: every module path is a module, and lower layers never import higher ones.

`import scanlab.decoder.stack as s` must give the module, not a function re-exported under its
name; a model file format may use the formats below it, never those beside or above it.
"""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import scanlab

SRC = Path(scanlab.__file__).parent
MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(scanlab.__path__, "scanlab.")
    if not name.endswith("__main__")  # importing it runs the CLI
)

# (modules, what they must not import): prefixes of dotted names.
LAYERS = [
    # The library never reaches up into its front ends or its benchmarks.
    ("scanlab", ("scanlab.cli", "scanlab.tour")),
    (
        "scanlab.decoder",
        (
            "scanlab.train",
            "scanlab.finetune",
            "scanlab.bench",
            "scanlab.nnx",
            "scanlab.render",
            "scanlab.serve",
        ),
    ),
    # The server runs a model: it trains nothing and measures nothing.
    ("scanlab.serve", ("scanlab.train", "scanlab.finetune", "scanlab.bench", "scanlab.render")),
    ("scanlab.train", ("scanlab.finetune", "scanlab.bench", "scanlab.render")),
    ("scanlab.finetune", ("scanlab.bench", "scanlab.render")),
    ("scanlab.bench", ("scanlab.render",)),
    # The display layer formats what it is handed: it runs no model and no benchmark.
    ("scanlab.render", ("scanlab.train", "scanlab.finetune", "scanlab.bench", "scanlab.decoder")),
    # Model math knows nothing of files, loading or conversations.
    (
        "scanlab.decoder.params scanlab.decoder.families scanlab.decoder.config scanlab.decoder.spec "
        "scanlab.decoder.weights scanlab.decoder.qmatvec scanlab.decoder.lora scanlab.decoder.quant "
        "scanlab.decoder.layers "
        "scanlab.decoder.cache "
        "scanlab.decoder.stack scanlab.decoder.model scanlab.decoder.sampling "
        "scanlab.decoder.generation scanlab.decoder.slots",
        ("scanlab.decoder.formats", "scanlab.decoder.load", "scanlab.decoder.chat"),
    ),
    # The weight protocol knows no form; a form knows no other form it does not wrap (quant's
    # layouts for the kernel are the one conversion between forms).
    (
        "scanlab.decoder.weights",
        (
            "scanlab.decoder.qmatvec scanlab.decoder.quant scanlab.decoder.lora scanlab.decoder.spec".split()
        ),
    ),
    (
        "scanlab.decoder.qmatvec scanlab.decoder.lora",
        ("scanlab.decoder.quant", "scanlab.decoder.spec"),
    ),
    ("scanlab.decoder.quant", ("scanlab.decoder.lora", "scanlab.decoder.spec")),
    # Each format depends only downward: base <- gguf_file, hf <- tokenizer <- load <- chat.
    (
        "scanlab.decoder.formats.base",
        (
            "scanlab.decoder.formats.hf",
            "scanlab.decoder.formats.gguf_file",
            "scanlab.decoder.formats.tokenizer",
            "scanlab.decoder.formats.pretrained",
        ),
    ),
    (
        "scanlab.decoder.formats.gguf_file",
        ("scanlab.decoder.formats.hf", "scanlab.decoder.formats.tokenizer"),
    ),
    # GGUF's block formats are bytes to integers: no model, no other format.
    ("scanlab.decoder.formats.gguf_blocks", ("scanlab.decoder", "scanlab.errors")),
    (
        "scanlab.decoder.formats.hf",
        ("scanlab.decoder.formats.gguf_file", "scanlab.decoder.formats.tokenizer"),
    ),
    ("scanlab.decoder.formats.tokenizer", ("scanlab.decoder.formats.hf", "scanlab.decoder.load")),
    ("scanlab.decoder.load", ("scanlab.decoder.chat",)),
]


def runtime_imports(module: str) -> set[str]:
    """The scanlab modules `module` imports when it runs (type-checking-only imports left out)."""
    path = SRC.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name.startswith("scanlab")}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("name", MODULES)
def test_every_module_path_is_a_module(name):
    importlib.import_module(name)
    parent, _, child = name.rpartition(".")
    assert inspect.ismodule(getattr(importlib.import_module(parent), child)), name


@pytest.mark.parametrize(("modules", "forbidden"), LAYERS)
def test_lower_layers_never_import_higher_ones(modules, forbidden):
    for module in (m for m in MODULES for prefix in modules.split() if within(m, prefix)):
        if any(within(module, f) for f in forbidden):
            continue  # the forbidden layer itself (e.g. scanlab.cli under "scanlab")
        bad = {name for name in runtime_imports(module) for f in forbidden if within(name, f)}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_the_lazy_namespaces_resolve_every_listed_name():
    for package in ("scanlab", "scanlab.decoder", "scanlab.train", "scanlab.finetune"):
        namespace = importlib.import_module(package)
        for name in namespace.__all__:
            assert getattr(namespace, name) is not None, f"{package}.{name}"
