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
