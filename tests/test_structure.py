"""The house rules, checked on the source: imports flow one way, and the loop stays one screen."""

import ast
import inspect
import re
from pathlib import Path

import tsopsd.loop

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tsopsd"


def code_map() -> list[str]:
    """Module names in the order of the code map table (docs/design.md)."""
    text = (ROOT / "docs" / "design.md").read_text()
    section = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([\w/]+\.py)` \|", section, flags=re.M)
    return [("tsopsd." + r.removesuffix(".py").replace("/", ".")).removesuffix(".__init__") for r in rows]


def package_modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def imports_of(module: str) -> set[str]:
    """The tsopsd modules `module` imports, at any depth of its source (function-level imports too)."""
    rel = Path(*module.split("."))
    path = ROOT / (rel / "__init__.py" if (ROOT / rel).is_dir() else rel.with_suffix(".py"))
    found = set()
    tree = ast.parse(path.read_text())
    if module == "tsopsd":  # the package's lazy facade (`tsopsd.reheat` is api's, on first use): its
        # `__getattr__` runs on attribute access, never on import, so it is the one import that may go up
        tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "__getattr__")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tsopsd"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tsopsd":
            for a in node.names:  # `from tsopsd import x` names a module when x is one
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in set(package_modules()) else node.module)
    return found - {module}


def test_every_module_is_on_the_code_map():
    assert sorted(code_map()) == sorted(package_modules())


def test_imports_only_flow_down_the_code_map():
    order = {m: i for i, m in enumerate(code_map())}
    backwards = [f"{m} imports {d}" for m in order for d in sorted(imports_of(m)) if order[d] >= order[m]]
    assert not backwards, backwards


def test_leaves_import_nothing_of_ours():
    for leaf in ("tsopsd.family", "tsopsd.batch", "tsopsd.distributions", "tsopsd.intervals", "tsopsd.errors"):
        assert imports_of(leaf) == set(), leaf


def test_the_loop_never_asks_the_parallel_mode():
    source = inspect.getsource(tsopsd.loop.train) + inspect.getsource(tsopsd.loop.reheat_step)
    lines = [line for line in source.splitlines() if line.strip()]
    mode_words = re.compile(r"fsdp|ddp|world_size|is_main|\brank\b|DTensor|shard|torch\.distributed", re.I)
    assert not [line for line in lines if mode_words.search(line)]


def test_no_environment_variable_or_argument_for_tests_only():
    text = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    assert "TSOPSD_TEST" not in text and "interrupt_at_step" not in text and "on_trained" not in text
    env_reads = set(re.findall(r"environ(?:\.get)?\[?\(?\"(\w+)\"", text))
    env_reads |= set(re.findall(r"environ\.setdefault\(\"(\w+)\"", text))
    assert env_reads <= {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTORCH_CUDA_ALLOC_CONF"}, \
        env_reads


def test_the_readme_is_for_users_and_its_links_resolve():
    """A newcomer reaches a reheated checkpoint of their own within the first 60 lines; the README stays
    under 300 lines, the rest lives in docs/ files it links, and those exist."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    first = "\n".join(lines[:60])
    assert "tsopsd measure-entropy ckpt/" in first and "tsopsd reheat ckpt/ --prompts prompts.jsonl --out reheated/" in first
    links = set(re.findall(r"\]: (docs/[\w.]+)", "\n".join(lines)))
    assert links and all((ROOT / link).is_file() for link in links), links


def test_no_history_in_code_tests_or_docs():
    """The code, tests and docs say what is, not how it came to be: no issue numbers, no narration of earlier code."""
    words = re.compile("issue" + r" [0-9]|before" + r" this", re.I)
    found = [f"{path.relative_to(ROOT)}:{n}" for folder in ("tsopsd", "tests", "docs")
             for path in sorted((ROOT / folder).rglob("*")) if path.suffix in (".py", ".md", ".yaml")
             for n, line in enumerate(path.read_text().splitlines(), 1) if words.search(line)]
    assert not found, found
