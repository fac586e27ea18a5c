"""The import graph of rlhf_ds as a reader should see it: no circles between modules, no layer importing
from a layer above it, and imports inside functions only where they defer a heavy or optional dependency.

Every ``import`` counts, the ones inside functions too; imports under ``if TYPE_CHECKING:`` are for types
only and do not. The layer order is written once, below (lowest first): a module may import from its own
layer and the ones before it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rlhf_ds

PACKAGE = Path(rlhf_ds.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    ("choices", "config_loader", "fs", "env"),   # standard library and pyyaml only
    ("config_rules", "config"),                  # the config tree and its rules
    ("batch",),                                  # the batch record
    ("algo",),                                   # pure tensor math
    ("data", "rewards"),                         # prompts, tasks, rewards, scoring
    ("models",),                                 # tiny models, tokenizers, model files
    ("engine",),                                 # DeepSpeed
    ("rollout",),                                # generation engines, weight updates (vLLM)
    ("workers",),                                # one class per role
    ("cluster",),                                # groups (Ray), placement
    ("plan",),                                   # memory planning
    ("trainer",),                                # the loops
    ("bench_floor", "bench"),                    # the benchmark
    ("cli",),                                    # the command line
]

# An import inside a function must defer one of these (directly, or through the rlhf_ds module it imports,
# whose own top-level imports reach one): importing them costs seconds or needs an optional extra.
HEAVY = ("vllm", "deepspeed", "ray", "wandb", "torch", "transformers", "matplotlib", "tensorboard", "datasets",
         "pyarrow", "safetensors", "accelerate", "peft", "fastapi", "uvicorn", "httpx")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_only(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _in_functions(tree: ast.AST) -> set[int]:
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return inside


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, source: str | None = None) -> list[tuple[str, int, bool, list[str]]]:
    """(imported rlhf_ds module or external top-level name, line, inside a function, names) of ``module``."""
    tree = ast.parse(source if source is not None else MODULES[module].read_text())
    skip, inside = _type_only(tree), _in_functions(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif node.level:   # relative imports: rlhf_ds uses absolute ones only
            raise AssertionError(f"{module}:{node.lineno}: relative import")
        else:
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module or ""]
        for target in targets:
            resolved = _resolve(target) if target.startswith("rlhf_ds") else target.split(".")[0]
            if resolved and resolved != module:
                out.append((resolved, node.lineno, id(node) in inside, [a.name for a in node.names]))
    return out


def layer_of(module: str) -> int:
    head = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if head in names:
            return index
    raise AssertionError(f"{module} is in no layer of tests/unit/test_imports.py: add it where it belongs")


def graph(edges_of=imports_of) -> dict[str, set[str]]:
    return {m: {t for t, *_ in edges_of(m) if t in MODULES} for m in MODULES if m != "rlhf_ds"}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert not cycles(graph()), "modules importing each other in a circle"


def test_a_planted_circle_is_found():
    """The negative control: a module importing back into one that imports it is reported."""
    g = graph()
    g["rlhf_ds.algo.losses"] = g["rlhf_ds.algo.losses"] | {"rlhf_ds.trainer.rl_trainer"}
    assert any("rlhf_ds.algo.losses" in c and "rlhf_ds.trainer.rl_trainer" in c for c in cycles(g))


def test_no_layer_imports_from_a_layer_above_it():
    upward = [f"{m}:{line} imports {t}" for m in sorted(MODULES) if m != "rlhf_ds"
              for t, line, *_ in imports_of(m) if t in MODULES and t != "rlhf_ds" and layer_of(t) > layer_of(m)]
    assert not upward, "imports against the layer order (tests/unit/test_imports.py LAYERS):\n" + "\n".join(upward)


def _heavy_at_import(module: str, seen: set[str] | None = None) -> bool:
    """Whether importing ``module`` imports a heavy dependency at its top level, directly or through the
    rlhf_ds modules it imports at top level."""
    seen = seen if seen is not None else set()
    if module in seen:
        return False
    seen.add(module)
    for target, _, inside, _ in imports_of(module):
        if inside:
            continue
        if target in MODULES:
            if _heavy_at_import(target, seen):
                return True
        elif target in HEAVY:
            return True
    return False


def _function_starts(tree: ast.AST) -> list[int]:
    """The ``def`` line (1-based) of every function: a comment giving a deferral's reason follows it."""
    return [node.lineno for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def deferral_problems(module: str, source: str) -> list[str]:
    """What is wrong with ``module``'s imports inside functions: one that defers nothing heavy (it belongs
    at the top of the file), one that gives no reason (a comment on its line, or above its group)."""
    lines, problems, seen = source.splitlines(), [], set()
    starts = _function_starts(ast.parse(source))
    for target, line, inside, _ in imports_of(module, source):
        if not inside or (target, line) in seen:
            continue
        seen.add((target, line))
        heavy = target in HEAVY if target not in MODULES else _heavy_at_import(target)
        # the reason: on the import's line, or a comment above it in the same function (covering a group)
        start = max(s for s in starts if s < line)
        commented = "#" in lines[line - 1] or any(lines[k].strip().startswith("#") for k in range(start, line - 1))
        if not heavy:
            problems.append(f"{module}:{line} imports {target} inside a function: nothing heavy to defer")
        elif not commented:
            problems.append(f"{module}:{line} imports {target} inside a function without saying why")
    return problems


def test_imports_inside_functions_defer_a_heavy_dependency_and_say_so():
    """Each import inside a function defers a heavy or optional dependency (see HEAVY) and says why; an
    import that defers nothing belongs at the top of the file, where a reader sees it."""
    bad = [problem for module, path in sorted(MODULES.items()) for problem in deferral_problems(module, path.read_text())]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source,problems", [
    ("def f():\n    import torch\n", ["without saying why"]),
    ("def f():\n    import torch  # the training path alone needs it\n", []),
    ("def f():\n    # the training path alone needs it\n    import torch\n", []),
    ("def f():\n    # the training path alone needs them\n    import torch\n    import transformers\n", []),
    ("import os\ndef f():\n    import json  # why not\n", ["nothing heavy to defer"]),
    ("import json\n", []),
])
def test_the_function_import_rule_sees_what_it_should(source, problems):
    """The negative controls: planted sources with and without the problems the rule reports."""
    found = deferral_problems("rlhf_ds.planted", source)
    assert len(found) == len(problems) and all(p in f for p, f in zip(problems, found, strict=True))
