"""`--dataset manifest`: a CSV of path,label,split (issue 12).

A manifest over the same images gives the features of `--dataset imagefolder`; paths are absolute or relative
to the CSV's folder (not the working folder); the cache is reused until an image's bytes change; undecodable
files follow --on-bad-image; and every bad manifest fails with one `Error:` line naming the row and the fix,
exit 1, before anything is written. The FIFO cases run in a subprocess with a timeout, as a hang would block.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusion_cache.cache import lock_path, open_cache, partial_path
from fusion_cache.sources.imagefolder import load_image_folder
from fusion_cache.sources.manifest import load_manifest
from fusion_cache.errors import FusionCacheError
from fusion_cache.report import figure_sources

from .hostile import clean_failure, denials, deny, run, snapshot  # noqa: F401 (denials: a fixture)

HEADER = "path,label,split\n"


def _extract(dataset, root, weights, out, *extra):
    return run("extract", "--dataset", dataset, "--data-root", root, "--weights", weights, "--train-size", "all",
               "--test-size", "all", "--image-size", 32, "--workers", 0, "--no-progress", "--out", out, *extra)


def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return path


def _folder_rows(root: Path) -> list[tuple[str, str, str]]:
    """(path relative to root, class, split) of every image, in ImageFolder's order within each split."""
    rows = []
    for split in ("train", "test"):
        src = load_image_folder(root, split)
        rows += [(f"{split}/{f}", src.classes[label], split) for f, label in zip(src.files, src.labels)]
    return rows


def _image(path: Path, value: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _nothing_written(out: Path, before: dict, tmp: Path) -> None:
    assert not out.exists() and not partial_path(out).exists() and not lock_path(out).exists()
    assert snapshot(tmp) == before, "the failed run changed files"


# -------------------------------------------------------------------------- the same features as imagefolder


@pytest.fixture
def images(tmp_path, folder_root) -> Path:
    """A private copy of the PNG folder fixture (RGB, gray, RGBA, palette and 16-bit images of odd sizes)."""
    return Path(shutil.copytree(folder_root, tmp_path / "images"))


def test_manifest_in_imagefolder_order_gives_the_imagefolder_cache(tmp_path, images, weights_file):
    rows = _folder_rows(images)
    manifest = _write_csv(images / "list.csv", rows)
    r = _extract("imagefolder", images, weights_file, tmp_path / "f.h5")
    assert r.exit_code == 0, r.output
    r = _extract("manifest", manifest, weights_file, tmp_path / "m.h5")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("wrote") and "train 15, test 6 images" in r.output, r.output
    f, m = open_cache(tmp_path / "f.h5"), open_cache(tmp_path / "m.h5")
    assert m.classes == f.classes == ["cats", "dogs", "owls"]
    assert m.meta.dataset == "manifest" and m.meta.data_root == str(manifest.resolve())
    for split in ("train", "test"):
        assert np.array_equal(m.labels(split), f.labels(split)) and np.array_equal(m.indices(split), f.indices(split))
        for tap in f.taps:
            assert np.array_equal(m.features(tap, split), f.features(tap, split)), (split, tap)
    # the same images listed with the same labels: everything but the dataset and the listing is the same
    assert m.meta.data_identity != f.meta.data_identity and m.fingerprint != f.fingerprint


def test_relative_paths_start_at_the_csv_folder_not_the_working_folder(tmp_path, images, weights_file, monkeypatch):
    """Rows shuffled, splits interleaved, half the paths absolute and half relative to lists/ (../images/...),
    run from another folder: row i of the cache is the imagefolder's image with the same path."""
    rows = _folder_rows(images)
    random.Random(0).shuffle(rows)
    listed = [(str(images / p) if i % 2 else f"../images/{p}", label, split)
              for i, (p, label, split) in enumerate(rows)]
    assert any(os.path.isabs(p) for p, _, _ in listed) and not all(os.path.isabs(p) for p, _, _ in listed)
    _write_csv(tmp_path / "lists" / "shuffled.csv", listed)
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)  # where ../images/ is not the images
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")
    r = _extract("manifest", "../../lists/shuffled.csv", weights_file, tmp_path / "m.h5")
    assert r.exit_code == 0, r.output
    r = _extract("imagefolder", images, weights_file, tmp_path / "f.h5")
    assert r.exit_code == 0, r.output
    f, m = open_cache(tmp_path / "f.h5"), open_cache(tmp_path / "m.h5")
    assert m.classes == f.classes
    for split in ("train", "test"):
        src = load_image_folder(images, split)
        where = {f"{split}/{p}": i for i, p in enumerate(src.files)}
        mine = [(p, label) for p, label, s in rows if s == split]  # the manifest's rows of this split, in order
        order = [where[p] for p, _ in mine]
        assert sorted(order) == list(range(len(src))) and order != sorted(order)  # a real permutation
        assert [m.classes[y] for y in m.labels(split)] == [label for _, label in mine]
        for tap in ("features.3", "features.18"):  # other batch neighbours: equal to float rounding
            np.testing.assert_allclose(m.features(tap, split), f.features(tap, split)[order], rtol=1e-5, atol=1e-6)
    paths = load_manifest(tmp_path / "lists" / "shuffled.csv", "train").paths
    assert paths == [p for p, _, s in listed if s == "train"]  # shown as written


def test_rerun_reuses_and_a_changed_image_changes_the_fingerprint(tmp_path, weights_file):
    rows = [("imgs/a.png", "cat", "train"), ("imgs/b.png", "dog", "train"), ("imgs/c.png", "cat", "test"),
            ("imgs/d.png", "dog", "test")]
    for i, (p, _, _) in enumerate(rows):
        _image(tmp_path / p, value=40 * i)
    manifest = _write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "c.h5"
    r = _extract("manifest", manifest, weights_file, out)
    assert r.exit_code == 0 and r.output.startswith("wrote"), r.output
    first = open_cache(out).fingerprint
    r = _extract("manifest", manifest, weights_file, out)
    assert r.exit_code == 0 and r.output.startswith("reused"), r.output
    identity = load_manifest(manifest, "test").identity
    sources = figure_sources(open_cache(out))  # report finds the images through the CSV recorded in the cache
    assert sources["train"].paths == ["imgs/a.png", "imgs/b.png"] and sources["test"].identity == identity

    _image(tmp_path / "imgs" / "d.png", value=250)  # other bytes, same name, label and row
    assert load_manifest(manifest, "test").identity != identity
    r = _extract("manifest", manifest, weights_file, out)
    assert clean_failure(r, "built with other settings") is None, clean_failure(r, "built with other settings")
    with pytest.raises(FusionCacheError, match="are not the ones"):
        figure_sources(open_cache(out), data_root=manifest)
    r = _extract("manifest", manifest, weights_file, out, "--force")
    assert r.exit_code == 0 and r.output.startswith("wrote"), r.output
    assert open_cache(out).fingerprint != first


def test_load_manifest_reads_a_spreadsheet_style_csv(tmp_path):
    """A byte order mark, header names in any case and order, extra columns, blank lines, spaces around labels
    and splits: classes sorted, rows in order, paths as written."""
    _image(tmp_path / "x" / "1.png")
    _image(tmp_path / "x" / "2.png")
    _image(tmp_path / "x" / "3.png")
    text = ("\ufeffSplit,Notes,Path,LABEL\r\n train,first,x/2.png, zebra \r\n\r\ntrain,,x/1.png,ant\r\n"
            "test,,x/3.png,zebra\r\ntest,,x/1.png,ant\r\n")
    (tmp_path / "m.csv").write_text(text, encoding="utf-8", newline="")
    src = load_manifest(tmp_path / "m.csv", "train")
    assert src.dataset == "manifest" and src.classes == ["ant", "zebra"]
    assert src.labels.tolist() == [1, 0] and src.paths == ["x/2.png", "x/1.png"] and src.root == tmp_path
    assert src.image(0).shape == (3, 8, 8)
    assert load_manifest(tmp_path / "m.csv", "test").labels.tolist() == [1, 0]


# -------------------------------------------------------------------------- bad images follow --on-bad-image


def test_undecodable_image_fails_or_is_skipped(tmp_path, weights_file):
    rows = [("imgs/a.png", "cat", "train"), ("imgs/bad.png", "cat", "train"), ("imgs/b.png", "dog", "train"),
            ("imgs/c.png", "cat", "test"), ("imgs/d.png", "dog", "test")]
    for i, (p, _, _) in enumerate(rows):
        _image(tmp_path / p, value=40 * i)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png at all")
    manifest = _write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "c.h5"
    before = snapshot(tmp_path)
    r = _extract("manifest", manifest, weights_file, out)
    problem = clean_failure(r, "Error: cannot read image imgs/bad.png: ")
    assert problem is None and r.exit_code == 1, problem
    assert "--on-bad-image skip" in r.output and r.output.count("\n") == 1, r.output
    _nothing_written(out, before, tmp_path)

    r = _extract("manifest", manifest, weights_file, out, "--on-bad-image", "skip")
    assert r.exit_code == 0, r.output
    assert "skipped unreadable train image: imgs/bad.png\n" in r.output, r.output
    m = open_cache(out).meta
    assert m.skipped == {"train": ["imgs/bad.png"]} and m.train_size == 2 and m.test_size == 2


def _cli(*args, timeout=300):
    code = "import sys; from fusion_cache.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_fifos_never_hang(tmp_path, weights_file):
    """A FIFO listed as an image is a bad image (skipped); a FIFO passed as the manifest is refused. Opening
    either for reading would block until a writer comes: the subprocess's timeout catches a hang."""
    rows = [("a.png", "cat", "train"), ("pipe.png", "cat", "train"), ("b.png", "cat", "test")]
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png", value=20)
    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "pipe.csv")
    manifest = _write_csv(tmp_path / "m.csv", rows)
    base = ["extract", "--dataset", "manifest", "--weights", weights_file, "--train-size", "all", "--test-size",
            "all", "--image-size", 32, "--workers", 0, "--no-progress", "--out", tmp_path / "c.h5"]
    p = _cli(*base, "--data-root", manifest, "--on-bad-image", "skip")
    assert p.returncode == 0, p.stderr
    assert "skipped unreadable train image: pipe.png" in p.stderr, p.stderr
    assert open_cache(tmp_path / "c.h5").meta.skipped == {"train": ["pipe.png"]}

    p = _cli(*base[:-1], tmp_path / "d.h5", "--data-root", tmp_path / "pipe.csv")
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error")]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert errors == [f"Error: manifest {tmp_path / 'pipe.csv'} is a named pipe (FIFO), not a CSV file; pass "
                      "--data-root the path of a UTF-8 CSV whose header names the columns path,label and, optionally, split"], p.stderr
    assert not (tmp_path / "d.h5").exists()


# -------------------------------------------------------------------------- bad manifests: one line, exit 1
# Each builder gets the test folder (holding imgs/a.png, imgs/b.png, imgs/c.png and imgs/sub/) and returns
# (the --data-root to pass, a fragment of the one error line). Rows count as a spreadsheet counts them.

GOOD = "imgs/a.png,cat,train\nimgs/b.png,cat,test\n"


def _csv_text(tmp: Path, text: str, name: str = "m.csv") -> Path:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return p


def missing_csv(tmp):
    return tmp / "nope.csv", f"manifest {tmp / 'nope.csv'} does not exist; pass --data-root the path of a UTF-8 CSV"


def csv_is_a_folder(tmp):
    return tmp / "imgs", f"manifest {tmp / 'imgs'} is a folder, not a CSV file; pass --data-root the path of"


def csv_is_a_device(tmp):
    return Path(os.devnull), f"manifest {os.devnull} is a device file, not a CSV file"


def csv_unreadable(tmp):
    p = deny(_csv_text(tmp, HEADER + GOOD))  # as root, opening it is made to fail
    return p, f"cannot read manifest {p} (permission denied); fix its permissions"


def csv_not_utf8(tmp):
    p = tmp / "m.csv"
    p.write_bytes((HEADER + GOOD + "imgs/c.png,caf\xe9,train\n").encode("latin-1"))
    return p, f"manifest {p} row 4 is not UTF-8 text (byte 0xe9 at byte 15 of the row); save the manifest as UTF-8"


def csv_is_an_image(tmp):
    return tmp / "imgs" / "a.png", "row 1 is not UTF-8 text (byte 0x89 at byte 1 of the row)"


def empty_csv(tmp):
    p = _csv_text(tmp, "\n\n")
    return p, f"manifest {p} is empty; write a header path,label,split, then one row per image"


def header_only(tmp):
    return _csv_text(tmp, HEADER), "has a header but no rows; add one row per image: path,label,split"


def no_header(tmp):
    return _csv_text(tmp, GOOD), "has no path or label column in its header (row 1); make the first row path,label"


def header_lacks_split(tmp):  # the rows are split for you, and one image cannot be
    return _csv_text(tmp, "path,label\nimgs/a.png,cat\n"), "every row: 1 image(s), too few to split into train and test"


def header_names_a_column_twice(tmp):
    return _csv_text(tmp, "path,label,split,path\n"), "names the column path twice in its header (row 1); keep one"


def no_test_rows(tmp):  # the train rows are split for you, and one image cannot be
    return _csv_text(tmp, HEADER + "imgs/a.png,cat,train\n"), "the train rows: 1 image(s), too few to split"


def no_train_rows(tmp):
    return _csv_text(tmp, HEADER + "imgs/a.png,cat,test\n"), "has no train rows; add rows with split train"


def too_many_fields(tmp):
    return (_csv_text(tmp, HEADER + GOOD + "imgs/c,d.png,cat,train\n"),
            'row 4 has 4 fields, the header 3; write a path or label that holds a comma in double quotes')


def too_few_fields(tmp):
    return _csv_text(tmp, HEADER + "imgs/a.png,cat\n" + GOOD), "row 2 has 2 fields, the header 3"


def empty_path(tmp):
    return (_csv_text(tmp, HEADER + GOOD + ",cat,train\n"),
            "row 4 has an empty path; give the image's path (absolute, or relative to the manifest's folder)")


def empty_label(tmp):
    return _csv_text(tmp, HEADER + GOOD + "imgs/c.png, ,test\n"), "row 4 has an empty label; give the image's class"


def control_character_label(tmp):
    return (_csv_text(tmp, HEADER + GOOD + "imgs/c.png,c\aat,test\n"),
            r"row 4 has a label with a control character (c\x07at); use a printable class name")


def unknown_split(tmp):
    return _csv_text(tmp, HEADER + GOOD + "imgs/c.png,cat,holdout\n"), "row 4 has the split 'holdout'; use train, test or val"


def missing_file(tmp):
    # a blank line: row 5 is the fifth line, as an editor or a spreadsheet numbers it
    p = _csv_text(tmp, HEADER + GOOD + "\nimgs/nope.png,cat,test\n")
    return p, f"manifest {p} row 5: imgs/nope.png does not exist; fix the path (a relative path starts at the " \
              f"manifest's folder, {tmp}) or remove the row"


def newline_in_missing_path(tmp):
    return (_csv_text(tmp, HEADER + GOOD + '"imgs/no\npe.png",cat,test\n'),
            r"row 4: imgs/no\x0ape.png does not exist")


def rows_count_lines(tmp):
    """A quoted path over two lines is one row that takes two lines: the rows after it count lines."""
    _image(tmp / "imgs" / "new\nline.png")
    return (_csv_text(tmp, HEADER + '"imgs/new\nline.png",cat,train\n' + GOOD + "imgs/nope.png,cat,test\n"),
            "row 6: imgs/nope.png does not exist")


def missing_absolute_file(tmp):
    return _csv_text(tmp, HEADER + GOOD + f"{tmp}/gone.png,cat,test\n"), f"row 4: {tmp}/gone.png does not exist"


def missing_only_in_test(tmp):
    """The train split alone is fine: the test row's error still comes before any extraction."""
    return _csv_text(tmp, HEADER + "imgs/nope.png,cat,test\n" + GOOD), "row 2: imgs/nope.png does not exist"


def broken_link(tmp):
    os.symlink("nowhere.png", tmp / "imgs" / "broken.png")
    return (_csv_text(tmp, HEADER + GOOD + "imgs/broken.png,cat,test\n"),
            "row 4: imgs/broken.png is a broken symbolic link")


def link_loop(tmp):
    os.symlink("loop.png", tmp / "imgs" / "loop.png")
    return (_csv_text(tmp, HEADER + GOOD + "imgs/loop.png,cat,test\n"),
            "row 4: imgs/loop.png cannot be opened (a symbolic link loop)")


def path_is_a_folder(tmp):
    return _csv_text(tmp, HEADER + GOOD + "imgs/sub,cat,train\n"), "row 4: imgs/sub is a folder; list its image files"


def path_through_a_file(tmp):
    return _csv_text(tmp, HEADER + GOOD + "imgs/a.png/x.png,cat,train\n"), "row 4: imgs/a.png/x.png does not exist"


def nul_in_path(tmp):
    return (_csv_text(tmp, HEADER + GOOD + "imgs/a\0.png,cat,train\n"),
            r"row 4 has a path with a NUL character (imgs/a\x00.png)")


def huge_field(tmp):
    return (_csv_text(tmp, HEADER + GOOD + "x" * 200_000 + ",cat,train\n"),
            f"row 4 has a field over {csv.field_size_limit()} characters (an unclosed quote?); close the quote")


def unclosed_quote(tmp):
    return (_csv_text(tmp, HEADER + GOOD + '"imgs/c.png,cat,train\n' + GOOD),
            "row 4 is not valid CSV (unexpected end of data); write a field that holds a comma or a quote in double")


def stray_quote(tmp):
    return _csv_text(tmp, HEADER + GOOD + '"imgs/c.png"x,cat,train\n'), "row 4 is not valid CSV"


def huge_line(tmp):
    return _csv_text(tmp, HEADER + GOOD + "a," * 600_000 + "\n"), "row 4 is over 1 MiB long"


def lone_carriage_returns(tmp):
    return _csv_text(tmp, (HEADER + GOOD).replace("\n", "\r")), r"row 1 has a lone carriage return (\r)"


def class_only_in_test(tmp):
    return (_csv_text(tmp, HEADER + GOOD + "imgs/c.png,dog,test\n"),
            "Error: class 'dog' is in test but not in train; train and test must hold the same classes: add train "
            "rows labelled 'dog', or remove its test rows")


CASES = [
    missing_csv, csv_is_a_folder, csv_is_a_device, csv_unreadable, csv_not_utf8, csv_is_an_image, empty_csv,
    header_only, no_header, header_lacks_split, header_names_a_column_twice, no_test_rows, no_train_rows,
    too_many_fields, too_few_fields, empty_path, empty_label, control_character_label, unknown_split, missing_file,
    newline_in_missing_path, rows_count_lines, missing_absolute_file, missing_only_in_test, broken_link, link_loop,
    path_is_a_folder, path_through_a_file, nul_in_path, huge_field, unclosed_quote, stray_quote, huge_line,
    lone_carriage_returns, class_only_in_test,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_manifest_is_one_line_and_writes_nothing(tmp_path, weights_file, monkeypatch, denials, case):
    monkeypatch.chdir(tmp_path)  # stray files would show in the snapshot
    for name in "abc":
        _image(tmp_path / "imgs" / f"{name}.png")
    (tmp_path / "imgs" / "sub").mkdir()
    root, fragment = case(tmp_path)
    out = tmp_path / "c.h5"
    before = snapshot(tmp_path)
    for extra in ([], ["--on-bad-image", "skip"]):  # a bad manifest is not a bad image
        r = _extract("manifest", root, weights_file, out, *extra)
        problem = clean_failure(r, fragment)
        assert problem is None, problem
        assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("Error: "), r.output
        _nothing_written(out, before, tmp_path)


def test_load_manifest_raises_the_same_error_for_both_splits(tmp_path):
    (tmp_path / "m.csv").write_text(HEADER + "a.png,cat,train\nb.png,cat,test\n")
    _image(tmp_path / "b.png")
    errors = []
    for split in ("train", "test"):
        with pytest.raises(FusionCacheError) as e:
            load_manifest(tmp_path / "m.csv", split)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "row 2: a.png does not exist" in errors[0]


@pytest.mark.parametrize("dataset", ["imagefolder", "cifar10"])
def test_a_file_is_refused_for_the_folder_datasets(tmp_path, weights_file, dataset):
    manifest = _csv_text(tmp_path, HEADER + GOOD)
    before = snapshot(tmp_path)
    r = _extract(dataset, manifest, weights_file, tmp_path / "c.h5", "--no-download")
    expect = (f"Error: --data-root {manifest} is a file; --dataset {dataset} reads a folder: pass a folder, or "
              "--dataset manifest for a CSV list of images\n")
    assert r.exit_code == 1 and r.output == expect, r.output
    _nothing_written(tmp_path / "c.h5", before, tmp_path)


def test_help_describes_the_manifest():
    r = run("extract", "--help")
    text = " ".join(r.output.split())
    assert r.exit_code == 0
    assert "manifest: a CSV file with the header path,label[,split], one row per image" in text
    assert "auto: tell from --data-root which of the layouts below it is" in text
