"""Repository guards: every test tier is collected."""
import fnmatch
import pathlib
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
