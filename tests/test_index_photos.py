"""`tgems index` on a user's own photos (issue 23.5): a flat folder, webdataset shards and parquet read as
streams; an unreadable image listed and skipped; hits as file paths or ids; `tgems index-fit` fits the
retrieval maps for another model, and the refusal of another model's maps says how."""
import json
from pathlib import Path

import pytest
from PIL import Image

from helpers import assert_one_line_error, run_cli
from stream_helpers import make_parquet, make_shards, scene_images


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A flat folder: 12 scenes images as PNG and one file that is not an image."""
    root = tmp_path_factory.mktemp("photos") / "holiday"
    root.mkdir()
    images, _ = scene_images(12, seed=5)
    for i, img in enumerate(images):
        img.save(root / f"IMG_{i:04d}.png")
    (root / "IMG_9999.png").write_bytes(b"not a png at all" * 8)
    return root, images


def test_flat_folder_indexed_with_a_bad_file_skipped(photos, tmp_path, capsys):
    root, _ = photos
    out = tmp_path / "idx"
    rc, stdout, err = run_cli(capsys, "index", "--data", f"folder:{root}", "--out", out, "--workers", "0",
                              "--quiet", "--json", tmp_path / "i.json")
    assert rc == 0, err
    assert "indexed 12 images" in stdout
    (line,) = err.strip().splitlines()
    assert line.startswith("tgems: skipped 1 unreadable image(s)") and "IMG_9999.png" in line
    header = json.loads((out / "index.json").read_text())
    assert header["ids"] == [f"IMG_{i:04d}.png" for i in range(12)]
    (skip,) = header["meta"]["skipped"]
    assert skip["id"] == "IMG_9999.png" and "not an image" in skip["reason"]
    assert json.loads((tmp_path / "i.json").read_text())["skipped"] == [skip]
    rc, stdout, err = run_cli(capsys, "search", "--index", out, "a red star", "--k", "3", "--json", tmp_path / "s.json")
    assert rc == 0, err
    paths = [ln.split("\t")[1] for ln in stdout.strip().splitlines()]
    assert len(paths) == 3 and all(Path(p).is_file() and Path(p).parent == root for p in paths)
    hits = json.loads((tmp_path / "s.json").read_text())["hits"]
    assert [h["path"] for h in hits] == paths and all(h["id"].startswith("IMG_") for h in hits)


def test_folder_with_budget_calibrates_on_a_sample_of_itself(photos, tmp_path, capsys):
    root, _ = photos
    rc, stdout, err = run_cli(capsys, "index", "--data", f"folder:{root}", "--out", tmp_path / "idx",
                              "--budget", "0.6", "--n-calib", "8", "--workers", "0", "--quiet",
                              "--json", tmp_path / "i.json")
    assert rc == 0, err
    info = json.loads((tmp_path / "i.json").read_text())
    # 8 sampled of the 13 files; the unreadable one, when drawn, is left out
    assert info["calibration"]["goal"] == "budget" and info["calibration"]["calib_images"] in (7, 8)
    assert info["images"] == 12 and info["mean_layers"] <= 12


def test_webdataset_and_parquet_indexed_by_their_ids(photos, tmp_path, capsys):
    _, images = photos
    pattern, keys = make_shards(tmp_path / "wds", images, per_shard=5)
    rc, _, err = run_cli(capsys, "index", "--data", f"webdataset:{pattern}", "--out", tmp_path / "w",
                         "--workers", "0", "--quiet")
    assert rc == 0, err
    assert json.loads((tmp_path / "w" / "index.json").read_text())["ids"] == keys
    ids = make_parquet(tmp_path / "t.parquet", images, null_rows=(3,))
    rc, stdout, err = run_cli(capsys, "index", "--data", f"parquet:{tmp_path / 't.parquet'}", "--out", tmp_path / "p",
                              "--workers", "0", "--quiet")
    assert rc == 0, err
    header = json.loads((tmp_path / "p" / "index.json").read_text())
    assert header["ids"] == [i for j, i in enumerate(ids) if j != 3]
    assert header["meta"]["skipped"] == [{"id": ids[3], "reason": "no image bytes (null)"}]
    rc, stdout, err = run_cli(capsys, "search", "--index", tmp_path / "p", "a red star", "--k", "2")
    assert rc == 0 and all(ln.split("\t")[1] in ids for ln in stdout.strip().splitlines())


def test_index_fit_for_another_model(photos, tiny_clip_dir, tmp_path, capsys):
    root, _ = photos
    rc, _, err = run_cli(capsys, "index", "--model", tiny_clip_dir, "--data", f"folder:{root}", "--out", tmp_path / "x",
                         "--quiet")
    line = assert_one_line_error(rc, err)
    assert "made for another backbone" in line and "tgems index-fit --model" in line
    maps = tmp_path / "maps"
    rc, _, err = run_cli(capsys, "index-fit", "--model", tiny_clip_dir, "--data", f"folder:{root}", "--out", maps,
                         "--epochs", "2", "--json", tmp_path / "f.json")
    assert rc == 0, err
    assert f"tgems index --model {tiny_clip_dir} --tgem {maps}" in err
    assert json.loads((tmp_path / "f.json").read_text())["images"] == 12
    rc, stdout, err = run_cli(capsys, "index", "--model", tiny_clip_dir, "--tgem", maps, "--data", f"folder:{root}",
                              "--out", tmp_path / "idx", "--workers", "0", "--quiet")
    assert rc == 0 and "indexed 12 images" in stdout, err
