"""The package's import graph: no cycles between modules, and every import points down the
declared layers (imports inside functions and under TYPE_CHECKING count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "peregrine"

# Lowest first. A module belongs to the longest entry that names it or a package above it;
# it may import its own layer and the layers below (never in a cycle), never a higher one.
LAYERS: list[list[str]] = [
    # foundations: settings, outputs, model files and configs, the tokenizer
    ["peregrine.config", "peregrine.outputs", "peregrine.models.errors",
     "peregrine.models.config", "peregrine.models.registry", "peregrine.models.gguf_file",
     "peregrine.models.gguf_quants",
     "peregrine.models.tokenizer", "peregrine.memory_model", "peregrine.lora.request"],
    # what a request asks for: grammar constraints and sampling parameters
    ["peregrine.structured", "peregrine.sampling_params"],
    # the attention contract: KV layout, attention metadata, the backend interface
    ["peregrine.attention_backend"],
    ["peregrine.kernels"],
    ["peregrine.layers"],
    # models and loading them (quantizing on load, quantized checkpoints)
    ["peregrine.models", "peregrine.quantization.apply", "peregrine.quantization.checkpoint"],
    # LoRA adapters: reading PEFT files, mapping them onto the model's linears, slots
    ["peregrine.lora"],
    # proposers: tokens and block tables in, draft tokens out
    ["peregrine.spec_decode"],
    # the step's state: sequences, their KV blocks, the batch the scheduler hands on
    ["peregrine.engine.sequence", "peregrine.engine.detokenizer", "peregrine.engine.kv_cache",
     "peregrine.engine.batch"],
    ["peregrine.sampling"],
    # power meters and the attribution of each step's energy and cost
    ["peregrine.energy"],
    # tensor and pipeline parallelism: sharding the model, worker processes, the driver's side
    ["peregrine.distributed"],
    ["peregrine.engine"],
    # entry points: offline API, server, offline quantization tools, benchmarks, estimates,
    # CLI
    ["peregrine.llm", "peregrine.server", "peregrine.quantization", "peregrine.bench",
     "peregrine.estimate", "peregrine.cli", "peregrine"],
]

def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The peregrine modules `name` imports anywhere in its file."""
    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.startswith("peregrine")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.split(".")[0] != "peregrine":
                continue
            for alias in node.names:  # a submodule by name, else the module itself
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else resolve(base))
    return {m for m in found if m is not None and m != name}


def layer_of(name: str) -> int:
    best, layer = "", -1
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            covers = name == entry or (entry != "peregrine" and name.startswith(entry + "."))
            if covers and len(entry) > len(best):
                best, layer = entry, i
    assert layer >= 0, f"{name} is in no layer: add it to LAYERS in {__file__}"
    return layer


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known)
            for name, path in known.items()}


def test_every_import_points_down_the_layers():
    wrong = [f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
             for src, dsts in graph().items() for dst in sorted(dsts)
             if layer_of(dst) > layer_of(src)]
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(wrong)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walker_sees_function_level_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "peregrine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from peregrine.b import x\ndef f():\n    import peregrine.c\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("")
    known = {"peregrine": pkg / "__init__.py", "peregrine.a": pkg / "a.py",
             "peregrine.b": pkg / "b.py", "peregrine.c": pkg / "c.py"}
    assert imports("peregrine.a", pkg / "a.py", known) == {"peregrine.b", "peregrine.c"}
