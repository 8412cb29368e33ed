"""The package as a whole: the public API at the root, and the layering rule (no module imports a module above
it; inference never imports training, evaluation or the CLI; benchmarks sit on the library, not the CLI),
checked by parsing every import statement, the lazy ones inside functions included."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tgems

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "tgems"

# Bottom to top. A module may import modules of a lower rank, and modules of its own sub-package
# (tgems.backbones.*, tgems.data.*, ...); nothing of its own rank in another place, nothing above.
# The package root is the public API: it lazily re-exports training, so only the CLI sits above it.
RANKS = {
    "tgems.errors": 0,
    "tgems.options": 0.5,  # shared defaults and the one set of option checks
    "tgems.io": 1, "tgems.pretrained": 1, "tgems.heap": 1,
    "tgems.images": 0.5,  # the one decode: below the torch-free leaves that decoding workers import
    # what a folder holds: the one listing for jobs and for the in-memory folder reader (tgems.data.folder)
    "tgems.jobs.lister": 1,
    "tgems.backbones": 2, "tgems.data": 2, "tgems.artifacts": 2,
    "tgems.features": 3, "tgems.engine": 3, "tgems.calibration": 3, "tgems.audit": 3,
    "tgems.readouts": 3.5,  # distilled readouts: torch only, read by the profiles and the Jumper's signals
    "tgems.chance": 4,
    "tgems.profiles": 4,
    "tgems.jumper": 5,
    "tgems.tgem": 6, "tgems.policies": 6,
    "tgems.classifier": 7, "tgems.scheduling": 7,
    "tgems.pipeline": 8, "tgems.spec": 8,
    "tgems.jobs": 8.5,
    "tgems.retrieval": 9,  # indexes streamed sources with the jobs' readers
    "tgems.indexing": 9.5,  # an index from a data spec; a saved index searched
    "tgems.integrations": 10, "tgems.serve": 10,
    "tgems.integrations.ray_serve": 10.5,  # the server's app, as a Ray Serve deployment
    "tgems.batch": 10.5,  # a whole job: the local runner or the Ray integration
    "tgems.training": 11, "tgems.evaluation": 11,
    "tgems": 12,
    "tgems.cli": 13,
}
UPPER = ("tgems.training", "tgems.evaluation", "tgems.cli")

# The one sanctioned exception: the demo fits a shipped checkpoint that is missing (a source tree without
# assets), lazily, inside the function that needs it.
ALLOWED = {("tgems.evaluation.demo", "tgems.training.fit"),
           # the k-shot baseline of `tgems eval` is a classifier whose Jumper is fit on the spot
           ("tgems.evaluation.harness", "tgems.training.jumper_fit")}
def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    p = SRC.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _from_imports(path: Path, mod: str):
    """(base, names) of every import in `path`, top-level and lazy alike; `import a` is (a, ())."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((a.name, ()) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            yield base, [a.name for a in node.names]


def _ours(names) -> set[str]:
    return {m for m in names if m == "tgems" or m.startswith("tgems.")}


def imports(path: Path, mod: str) -> set[str]:
    """Every tgems module `path` imports, at the top or inside functions (`from a import b` counts as a.b when
    b is a module, and as a too: the package a is imported on the way)."""
    out = set()
    for base, names in _from_imports(path, mod):
        out.add(base)
        out |= {f"{base}.{n}" for n in names if is_module(f"{base}.{n}")}
    return _ours(out)


def rank(mod: str) -> tuple[int, str]:
    """(rank, the RANKS key it falls under)."""
    key = max((k for k in RANKS if mod == k or mod.startswith(k + ".")), key=len)
    return RANKS[key], key


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p, module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_rank():
    assert len(graph()) > 30
    for mod in graph():
        if mod != "tgems":
            assert rank(mod)[1] != "tgems", f"{mod} is not in RANKS: place it in the layering"


def test_no_module_imports_a_module_above_it():
    bad = []
    for mod, deps in graph().items():
        r, home = rank(mod)
        for dep in deps:
            rd, dep_home = rank(dep)
            if dep_home == home and home != "tgems" or dep == mod:
                continue  # within one sub-package
            if rd < r:
                continue
            if (mod, dep) in ALLOWED:
                continue
            bad.append(f"{mod} (rank {r}) imports {dep} (rank {rd})")
    assert not bad, "\n".join(bad)


def test_inference_never_imports_training_evaluation_or_the_cli():
    bad = []
    for mod, deps in graph().items():
        if mod == "tgems" or any(mod == u or mod.startswith(u + ".") for u in UPPER):
            continue
        bad += [f"{mod} imports {d}" for d in deps if any(d == u or d.startswith(u + ".") for u in UPPER)]
    assert not bad, "\n".join(bad)
    # the library's own upper layers: training and evaluation never import the CLI, evaluation not training
    for mod, deps in graph().items():
        if mod.startswith(("tgems.training", "tgems.evaluation")):
            assert not any(d.startswith("tgems.cli") for d in deps), mod
        if mod.startswith("tgems.evaluation"):
            extra = {d for d in deps if d.startswith("tgems.training")} - {d for m, d in ALLOWED if m == mod}
            assert not extra, (mod, extra)


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    """The rule is only as good as the parser: imports inside functions and `from tgems import x` count."""
    f = PACKAGE / "profiles.py"
    deps = imports(f, "tgems.profiles")
    assert "tgems.data.scenes" in deps  # imported inside default_templates
    assert "tgems.training.fit" in imports(PACKAGE / "evaluation" / "demo.py", "tgems.evaluation.demo")
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from tgems import cli\n    import tgems.training.fit as fit\n")
    assert {"tgems", "tgems.cli", "tgems.training.fit"} <= imports(probe, "tgems.probe")


def test_benchmarks_never_import_the_cli():
    scripts = sorted((REPO / "benchmarks").glob("*.py"))
    assert scripts
    bad = [f"{p.name} imports {d}" for p in scripts for d in imports(p, "benchmarks") if d.startswith("tgems.cli")]
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------- the root


def test_fit_load_and_save_tgem_at_the_package_root():
    from tgems import tgem
    from tgems.training import fit

    assert tgems.fit_tgem is fit.fit_tgem and tgems.FitSettings is fit.FitSettings
    assert tgems.load_tgem is tgem.load_tgem and tgems.save_tgem is tgem.save_tgem
    for name in tgems.__all__:
        assert getattr(tgems, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        tgems.no_such_name  # noqa: B018


def test_importing_the_root_stays_light():
    """`import tgems` (and with it `tgems --help`) loads neither torch nor transformers."""
    code = "import sys, tgems; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["index-fit", "--help"], ["index", "--help"],
                                  ["serve", "--help"], ["classify", "--help"]])
def test_help_imports_no_torch(argv):
    """Each `--help` (the parsers read their defaults from the specs and settings classes) loads neither torch
    nor transformers."""
    code = ("import contextlib, io, sys\nfrom tgems.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass\n"
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# Files still over the limit, reported to the lead; remove a line once the file is split.
LONG = set()


def test_no_source_file_is_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert set(long) <= LONG, long
    assert (PACKAGE / "cli" / "__init__.py").is_file()  # the command line is a package, one module per group


def test_one_scheduling_package_for_jobs_and_the_server():
    g = graph()
    assert "tgems.scheduling.depth" in g["tgems.jobs.depth"] and "tgems.scheduling.depth" in g["tgems.serve.models"]
    assert "tgems.scheduling.drop" in g["tgems.serve.models"]
    from tgems.scheduling.depth import DepthScheduler
    from tgems.scheduling.driver import Driver
    from tgems.scheduling.drop import DropScheduler

    assert issubclass(DepthScheduler, Driver) and issubclass(DropScheduler, Driver)
    assert not [m for m in g if m in ("tgems.scheduler", "tgems.serve.drop")]


def import_edges(path: Path, mod: str) -> set[str]:
    """The modules `path` imports, top-level and lazy alike, as Python resolves them: `from a import b` is a.b
    when b is a module (the package a is only a path to it), else a."""
    out = set()
    for base, names in _from_imports(path, mod):
        out |= {f"{base}.{n}" if is_module(f"{base}.{n}") else base for n in names} if names else {base}
    return _ours(out) - {mod}


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_lazy_imports_included():
    edges = {module_name(p): import_edges(p, module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}
    assert len(edges) > 30 and "tgems.jobs.readers" in edges["tgems.jobs.runner"]
    assert not import_cycles(edges)
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds
