"""The layers of wan_tasks, and what each may import: a layer never reaches up.

Run by hand to see the plan: `.venv/bin/python -m tests.test_layers` prints each layer, the
layers and outside packages it imports, and any import that breaks the rules.

Every import counts, also those inside functions (a lazy import still reaches up) and those
under TYPE_CHECKING for the project's own layers; outside packages imported only for type
checking (boto3's stubs) are not a run-time dependency and are left out of the third-party rule.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "wan_tasks"

# Bottom to top. A layer may import the layers named in its `may` set, and no outside package
# named in its `never` set.
ORCHESTRATION = frozenset({"prefect", "prefect_aws", "prefect_redis"})
AWS = frozenset({"boto3", "botocore", "s3transfer"})


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]
    may: frozenset[str]
    never: frozenset[str]
    what: str


LAYERS = [
    Layer(
        "base",
        ("wan_tasks.errors", "wan_tasks.redact", "wan_tasks.settings"),
        frozenset(),
        ORCHESTRATION | AWS,
        "the error tree, redaction, the settings",
    ),
    Layer(
        "api", ("wan_tasks.api",), frozenset({"base"}), ORCHESTRATION | AWS, "the WaveSpeed client"
    ),
    Layer(
        "storage",
        ("wan_tasks.storage",),
        frozenset({"base"}),
        ORCHESTRATION,
        "S3 places, archiving, contact sheets, embedded SeaweedFS",
    ),
    Layer(
        "core",
        ("wan_tasks.core",),
        frozenset({"base", "api", "storage"}),
        ORCHESTRATION,
        "never pay twice: identity, ledger, submit-once, budget, redaction, manifests",
    ),
    Layer(
        "emulator",
        ("wan_tasks.emulator",),
        frozenset({"base", "api"}),
        ORCHESTRATION | AWS,
        "the local WaveSpeed emulator",
    ),
    Layer(
        "devstack",
        ("wan_tasks.devstack",),
        frozenset({"base", "api", "storage", "emulator"}),
        ORCHESTRATION,
        "local services and the embedded defaults",
    ),
    Layer(
        "integration",
        ("wan_tasks.integration",),
        frozenset({"base", "api", "storage", "core"}),
        frozenset(),
        "Prefect tasks, blocks, limits, locks, per-process clients",
    ),
    Layer(
        "flows",
        ("wan_tasks.flows",),
        frozenset({"base", "api", "storage", "core", "devstack", "integration"}),
        frozenset(),
        "the flows",
    ),
    Layer(
        "cli",
        ("wan_tasks.cli",),
        frozenset(
            {"base", "api", "storage", "core", "emulator", "devstack", "integration", "flows"}
        ),
        frozenset(),
        "the wan-video command",
    ),
]


def layer_of(module: str) -> Layer | None:
    for layer in LAYERS:
        if any(module == m or module.startswith(m + ".") for m in layer.modules):
            return layer
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclass
class Imports:
    runtime: set[str] = field(default_factory=set)
    typing_only: set[str] = field(default_factory=set)


def imports_of(path: Path, root: Path = ROOT) -> Imports:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = Imports()
    typing_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                typing_nodes.update(id(n) for n in ast.walk(inner))
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join([*base, node.module] if node.module else base)]
            elif node.module:
                names = [node.module]
                if node.module == "wan_tasks":  # `from wan_tasks import settings`
                    names = [f"wan_tasks.{alias.name}" for alias in node.names]
        target = found.typing_only if id(node) in typing_nodes else found.runtime
        target.update(names)
    return found


@dataclass
class Report:
    uses: dict[str, set[str]] = field(default_factory=dict)
    outside: dict[str, set[str]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)


def check(root: Path = ROOT) -> Report:
    report = Report({la.name: set() for la in LAYERS}, {la.name: set() for la in LAYERS})
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        if module == "wan_tasks":  # the public facade: lazy names from every layer
            continue
        layer = layer_of(module)
        if layer is None:
            report.violations.append(f"{module}: in no layer (add it to LAYERS)")
            continue
        found = imports_of(path, root)
        for name in sorted(found.runtime | found.typing_only):
            top = name.split(".")[0]
            if top == "wan_tasks":
                other = layer_of(name)
                if other is None:
                    if name != "wan_tasks":
                        report.violations.append(f"{module} imports {name}: in no layer")
                    continue
                if other.name == layer.name:
                    continue
                report.uses[layer.name].add(other.name)
                if other.name not in layer.may:
                    report.violations.append(
                        f"{module} ({layer.name}) imports {name} ({other.name}): "
                        f"{layer.name} may import only {sorted(layer.may) or 'no layer'}"
                    )
            elif name in found.runtime:
                report.outside[layer.name].add(top)
                if top in layer.never:
                    report.violations.append(
                        f"{module} ({layer.name}) imports {top}, which {layer.name} must not"
                    )
    return report


def test_no_layer_reaches_up() -> None:
    report = check()
    assert not report.violations, "\n".join(report.violations)


def test_the_check_catches_a_layer_reaching_up(tmp_path: Path) -> None:
    """The walker sees lazy imports inside functions, and `from wan_tasks import x`."""
    # On a copy of the package: a probe written into the real one would be seen by a layer
    # check running at the same time in the other test process.
    import shutil

    root = tmp_path / "wan_tasks"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    path = root / "api" / "_layer_probe.py"
    path.write_text("def f():\n    from wan_tasks.integration import tasks\n    import prefect\n")
    violations = check(root).violations
    assert any("_layer_probe" in v and "integration" in v for v in violations)
    assert any("_layer_probe" in v and "prefect" in v for v in violations)


@pytest.mark.parametrize("layer", [layer.name for layer in LAYERS])
def test_every_layer_has_modules(layer: str) -> None:
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    spec = next(item for item in LAYERS if item.name == layer)
    assert any(layer_of(m) is spec for m in modules)


def main() -> int:
    report = check()
    for layer in LAYERS:
        uses = ", ".join(sorted(report.uses[layer.name])) or "-"
        outside = ", ".join(sorted(report.outside[layer.name] - set(sys.stdlib_module_names)))
        print(f"{layer.name:12} {layer.what}")
        print(f"{'':12} imports layers: {uses}")
        print(f"{'':12} outside packages: {outside or '-'}")
    for line in report.violations:
        print("VIOLATION", line)
    return 1 if report.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
