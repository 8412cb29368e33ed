"""The README's Python example runs as written (from the package, with its shipped assets)."""
import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    pred, clf = scope["pred"], scope["clf"]
    assert len(pred.labels) == 8 and set(pred.labels) <= {"a red circle", "a blue star", "a green heart"}
    assert clf.calibration["goal"] == "budget" and clf.calibration["labels_used"] is False
    assert (tmp_path / "my_classifier" / "classifier.json").is_file()
    assert 1 <= pred.exit_layers.min() and pred.exit_layers.max() <= 12


def test_measured_figures_are_read_from_the_records(monkeypatch):
    """The README's results section and docs/results.md are what benchmarks/results_md.py renders from the JSON
    records: a figure typed by hand, or a record refreshed without re-rendering, fails here."""
    import importlib

    root = README.parent
    monkeypatch.syspath_prepend(str(root / "benchmarks"))  # as when the script runs: its siblings import
    results_md = importlib.import_module("results_md")
    assert results_md.main(["--readme", "--check"]) == 0, "run: python benchmarks/results_md.py --readme"
    assert results_md.main(["--check"]) == 0, "run: python benchmarks/results_md.py"
    text = README.read_text()
    demo = __import__("json").loads((root / "docs" / "results" / "demo.json").read_text())
    tampered = text.replace(results_md.readme_block(demo), results_md.readme_block(demo).replace("%", "% ", 1))
    assert tampered != text and results_md.render_readme(tampered, demo) == text
