"""Repository guards: every test tier is collected; the import rules of docs/design.md#package-layers hold."""
import ast
import fnmatch
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_test_tier_is_collected():
    # pytest's default norecursedirs contains "dist", which silently dropped tests/dist once.
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    tiers = sorted(p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    assert {"unit", "dist", "e2e"} <= set(tiers)
    assert "norecursedirs" in options
    skipped = [t for t in tiers if any(fnmatch.fnmatch(t, pattern) for pattern in options["norecursedirs"])]
    assert not skipped, f"pytest would skip tests/{skipped}"


def test_test_modules_have_distinct_names():
    # the test directories are not packages: two modules of one name collide when a session collects both
    seen: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    same = {name: paths for name, paths in seen.items() if len(paths) > 1 and name != "conftest.py"}
    assert not same, f"test modules of the same name: {same}"


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_ray_is_imported_only_under_cluster():
    package = ROOT / "rlhf_ds"
    outside = [str(p.relative_to(ROOT)) for p in sorted(package.rglob("*.py"))
               if p.parent != package / "cluster"
               and any(m == "ray" or m.startswith("ray.") for m in _imported_modules(p))]
    assert not outside, f"ray imported outside rlhf_ds/cluster/: {outside}"
    # the guard itself sees a Ray import where there is one
    assert any(m == "ray" for m in _imported_modules(package / "cluster" / "ray_group.py"))


def test_the_trainer_knows_no_launcher():
    # The trainer sees the group interface only: no Ray handles, no SPMD worker, no launcher branch.
    words = re.compile(r"\bhandles\b|\.worker\b|\.mode\b|launcher\s*==|==\s*[\"'](ray|deepspeed|local)[\"']")
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for p in sorted((ROOT / "rlhf_ds" / "trainer").rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if words.search(line)]
    assert not hits, hits
    assert words.search('if cfg.cluster.launcher == "deepspeed":') and words.search("roles.rollout.handles")
