"""Which layer may import which: the shape of the code, read from its imports (ast), not from
its line counts.

LAYERS names the modules of each layer (dotted names; a trailing ".*" takes a whole package) and
RULES says what each layer may import ("only": nothing of the repository's but those layers) or
may not ("never"); third-party imports are not counted, imports inside functions are. Update the tables when a module is renamed, moved or
added: a layer naming a module that does not exist fails here, so the tables cannot go stale
quietly. A rule that today's code breaks, and that work in progress is fixing, carries that as
its xfail reason (strict: the rule fails loudly once the code keeps it, so the mark comes off).
"""
import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# --- the tables ----------------------------------------------------------------------------------
LAYERS = {
    # The bottom: what describes the model and how the handler is configured.
    "spec": ["cifar10_serve.spec"],
    "settings": ["cifar10_serve.settings"],
    # Reading request bodies: the wire protocols (each also writes its own answers and errors)
    # and the record and JSON/base64 limits they share.
    "parsing": ["cifar10_serve.raw", "cifar10_serve.multipart", "cifar10_serve.kserve",
                "cifar10_serve.v2", "cifar10_serve.bodies"],
    # TorchServe's own answer shapes (top classes, the error object), which protocols write with.
    "answers": ["cifar10_serve.answers"],
    # Which forward serves (torch, ONNX Runtime fp32/int8, bf16) and its golden check.
    "runtime choice": ["cifar10_serve.runtimes"],
    # TorchServe 0.12's workarounds: the adapter between TorchServe and the package.
    "adapter": ["cifar10_serve.torchserve_adapter"],
    "package": ["cifar10_serve", "cifar10_serve.*"],
    "handler": ["cifar10_handler"],
    "training": ["train", "data", "evaluate", "export_onnx", "calibration", "convert"],
    # What a user or a test runs beside the server: never shipped in the .mar.
    "outside the archive": ["client", "proxy", "release", "tests.*", "bench.*", "demo.*"],
}

RULES = [
    # (layer, "only" or "never", layers, why, xfail reason where today's code breaks it)
    ("spec", "only", [], "everything reads the model's description from it", None),
    ("settings", "only", ["spec"], "settings are read and checked at start, before anything "
     "they configure", None),
    ("training", "never", ["runtime choice"], "training, evaluation and export do not depend "
     "on which forward the server chose (they share the forwards and their check: forwards.py)",
     None),
    ("answers", "never", ["parsing"], "an answer is written from what a request became, not by "
     "reading it again", None),
    ("package", "never", ["adapter"], "the TorchServe adapter sits on top: only the handler "
     "imports it (the package works without TorchServe's patches)", None),
    ("package", "never", ["handler", "training", "outside the archive"], "the .mar ships the "
     "package alone: the worker cannot import scripts, the client or the tests", None),
    ("training", "never", ["handler", "adapter"], "training does not run TorchServe's worker "
     "code", None),
]


# --- reading the imports -------------------------------------------------------------------------
SOURCES = ["cifar10_serve", "handler", "bench", "tests", "demo"]  # and the top-level scripts


def module_files():
    """{dotted module name: file} of the repository's own Python modules."""
    found = {}
    paths = [*ROOT.glob("*.py"), *(p for folder in SOURCES for p in (ROOT / folder).rglob("*.py"))]
    for path in sorted(paths):
        relative = path.relative_to(ROOT)
        if relative.parts[0] == "handler":  # TorchServe imports it by bare name
            relative = relative.relative_to("handler")
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:
            found[".".join(parts)] = path
    return found


MODULES = module_files()


def imports_of(name):
    """The repository's modules that ``name`` imports, anywhere in it (also inside functions)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*anchor, base] if p)
            # `from package import module` imports the module, `from module import name` it
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` of a package's module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def members(layer):
    patterns = LAYERS[layer]
    return {name for name in MODULES if any(fnmatch.fnmatchcase(name, p) for p in patterns)}


# --- the tests -----------------------------------------------------------------------------------
def test_every_module_a_layer_names_exists():
    for layer, patterns in LAYERS.items():
        for pattern in patterns:
            assert any(fnmatch.fnmatchcase(name, pattern) for name in MODULES), (
                f"LAYERS[{layer!r}] names {pattern}, which is no module of the repository: "
                f"update the table")


def test_the_import_reader_sees_what_the_handler_imports():
    """The reader itself: `from package import module, module` and `from package.module import
    name` both count as importing the module; third-party imports are not the repository's."""
    imported = imports_of("cifar10_handler")
    assert {"cifar10_serve.torchserve_adapter", "cifar10_serve.settings",
            "cifar10_serve.bodies"} <= imported
    assert all(name in MODULES for name in imported) and "torch" not in imported


def rule_id(rule):
    layer, kind, others, _, _ = rule
    return f"{layer} {kind} {'+'.join(others) or 'nothing'}"


@pytest.mark.parametrize("rule", [
    pytest.param(rule, marks=pytest.mark.xfail(strict=True, reason=rule[4]) if rule[4] else ())
    for rule in RULES], ids=rule_id)
def test_layer_rule(rule):
    layer, kind, others, why, _ = rule
    allowed = set().union(*(members(other) for other in others)) if others else set()
    broken = []
    for name in sorted(members(layer)):
        imported = imports_of(name)
        bad = imported - allowed if kind == "only" else imported & allowed
        if bad:
            broken.append(f"{name} imports {sorted(bad)}")
    assert not broken, f"{layer} {kind} {others} ({why}): " + "; ".join(broken)
