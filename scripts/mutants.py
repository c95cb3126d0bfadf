"""Mutation check: each deliberate bug below, applied alone to a scratch copy of the project, must fail at least
one of the tests named beside it. `make mutants` runs the whole list; it prints one row per mutant and exits 1
if any mutant survives (its tests pass), is stale (its text is no longer in the file), or its tests do not run.

A mutant is one exact-text replacement in one package file: `old` must occur exactly once (tests/test_mutants.py
keeps the list in step with the code). Each runs only the tests that should see it, in a copy of the tree under
a temporary folder, imported first through PYTHONPATH; the working tree is never touched.

    python scripts/mutants.py              # every mutant
    python scripts/mutants.py --only fp-precision,tap-deep-zero
    python scripts/mutants.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("fusion_cache", "tests", "pyproject.toml", "README.md", "scripts")


@dataclass(frozen=True)
class Mutant:
    id: str
    rule: str  # the rule the mutant breaks, in a few words
    file: str  # relative to the project root
    old: str  # exact text, present exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or files that must fail


MUTANTS: tuple[Mutant, ...] = (
    # -- pooling, preprocessing, taps and views
    Mutant("pool-avgmax-order", "avgmax stores the average, then the max", "fusion_cache/backbone.py",
           "torch.cat([avg, f.amax(dim=(2, 3))], dim=1)", "torch.cat([f.amax(dim=(2, 3)), avg], dim=1)",
           ("tests/test_extract.py::test_avgmax_pooling_stores_average_then_max",)),
    Mutant("pool-avg-is-max", "avg pooling is the spatial mean", "fusion_cache/backbone.py",
           "avg = f.mean(dim=(2, 3))", "avg = f.amax(dim=(2, 3))",
           ("tests/test_extract.py::test_cached_features_equal_direct_forward",)),
    Mutant("preprocess-mean-std", "normalization uses the weights' mean and std", "fusion_cache/backbone.py",
           "TF.normalize(x, list(self.mean), list(self.std))", "TF.normalize(x, list(self.std), list(self.mean))",
           ("tests/test_extract.py::test_cached_features_equal_direct_forward",)),
    Mutant("preprocess-no-antialias", "resizing is antialiased, as torchvision's Resize",
           "fusion_cache/backbone.py", "interpolation=INTERPOLATIONS[self.interpolation], antialias=True)",
           "interpolation=INTERPOLATIONS[self.interpolation], antialias=False)",
           ("tests/test_extract.py::test_image_folder_of_awkward_images",)),
    Mutant("view-tap-order", "a view concatenates its taps in tap order", "fusion_cache/cache.py",
           "for t in taps], axis=1)", "for t in reversed(taps)], axis=1)",
           ("tests/test_extract.py::test_view_api_concatenates_taps_in_order",)),
    # -- the subset and the validation split
    Mutant("subset-seed-ignored", "the subset draw follows --seed", "fusion_cache/sampler.py",
           "np.random.default_rng([seed, SPLITS", "np.random.default_rng([0, SPLITS",
           ("tests/test_extract.py::test_stratified_subset_is_seeded_proportional_and_unique",)),
    Mutant("val-split-overlaps", "validation rows are not fit rows", "fusion_cache/selection.py",
           "return np.sort(fit_rows), np.sort(val_rows)", "return np.sort(rows), np.sort(val_rows)",
           ("tests/test_report.py::test_validation_split_is_disjoint_stratified_and_seeded",)),
    # -- the heads' losses
    Mutant("grid-wd-gradient", "the grid's penalty gradient is wd * W", "fusion_cache/grid.py",
           "gW.add_(wd.view(B, 1, 1) * W)", "gW.add_(0.5 * wd.view(B, 1, 1) * W)",
           ("tests/test_grid_knn.py::test_each_stacked_head_reaches_its_own_optimum",)),
    Mutant("linear-head-wd", "LinearHead's L-BFGS loss adds wd / 2 ||W||^2", "fusion_cache/heads/linear.py",
           "loss_fn(layer(Xt), yt) + 0.5 * self.weight_decay", "loss_fn(layer(Xt), yt) + 0.05 * self.weight_decay",
           ("tests/test_grid_knn.py::test_each_stacked_head_equals_linearhead_alone",)),
    Mutant("knn-temperature", "kNN votes weigh exp(sim / T)", "fusion_cache/heads/knn.py",
           "torch.exp(sims / self.temperature)", "torch.exp(sims * self.temperature)",
           ("tests/test_grid_knn.py::test_knn_weighted_vote_by_hand",)),
    Mutant("logreg-C-as-wd", "logreg's C is the weight decay 1 / (n C)", "fusion_cache/selection.py",
           "return binary / (rows * value) if", "return binary / value if",
           ("tests/test_report.py::test_the_tuned_logreg_is_scikit_learns_logistic_regression",)),
    # -- atomic writes
    Mutant("atomic-write-in-place", "a file is written beside its name, then renamed", "fusion_cache/io.py",
           'fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")',
           "tmp = str(path); fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)",
           ("tests/test_io.py",)),
    Mutant("staged-folder-leftover", "a failed result folder leaves nothing behind", "fusion_cache/io.py",
           "        shutil.rmtree(tmp, ignore_errors=True)\n        if isinstance(e, OSError):\n"
           "            raise write_error(out, e)",
           "        if isinstance(e, OSError):\n            raise write_error(out, e)",
           ("tests/test_hostile.py::test_a_failed_run_leaves_the_old_results",)),
    Mutant("cache-written-in-place", "a cache is written under .partial, renamed when complete",
           "fusion_cache/cache.py", "return Path(str(path) + PARTIAL_SUFFIX)", "return Path(str(path))",
           ("tests/test_reliability.py::test_disk_full_keeps_a_resumable_partial",)),
    # -- the fingerprint and the golden files
    Mutant("fp-serialization", "the fingerprint's JSON never changes (every cache on disk stays valid)",
           "fusion_cache/cache.py", "json.dumps(spec, sort_keys=True)",
           'json.dumps(spec, sort_keys=True, separators=(",", ":"))',
           ("tests/test_golden.py::test_the_fixed_record_has_its_golden_fingerprint",)),
    Mutant("fp-precision", "the autocast precision is in the fingerprint", "fusion_cache/cache.py",
           'precision: str = _attr("str", fp=True)', 'precision: str = _attr("str")',
           ("tests/test_golden.py::test_feature_determining_fields_include_the_floor",)),
    Mutant("fp-dtype", "the storage dtype is in the fingerprint", "fusion_cache/cache.py",
           'dtype: str = _attr("str", fp=True)', 'dtype: str = _attr("str")',
           ("tests/test_golden.py::test_feature_determining_fields_include_the_floor",)),
    Mutant("headfile-intercept", "a saved head keeps its intercept", "fusion_cache/headfile.py",
           'get("intercept", "tensor"), get("mean", "tensor")', '0 * get("intercept", "tensor"), get("mean", "tensor")',
           ("tests/test_golden.py::test_golden_head_predicts_the_recorded_labels",)),
    Mutant("headfile-classes", "a saved head keeps its class order", "fusion_cache/headfile.py",
           'get("classes", "strs")', 'get("classes", "strs")[::-1]',
           ("tests/test_golden.py::test_golden_head_predicts_the_recorded_labels",)),
    Mutant("unreadable-folder-silent", "an unreadable class folder is an error, not an empty class",
           "fusion_cache/files.py", "        except OSError as e:\n            raise FusionCacheError(\n"
           "                f\"cannot read folder {display_path(folder)}",
           "        except FileNotFoundError as e:\n            raise FusionCacheError(\n"
           "                f\"cannot read folder {display_path(folder)}",
           ("tests/test_hostile_folders.py::test_hostile_folder[unreadable_folder]",)),
    # -- standardization and the tuned protocol's selection
    Mutant("std-with-eval-set", "LinearHead standardizes with its training rows only", "fusion_cache/heads/linear.py",
           "            self.mean_ = X.mean(axis=0)\n            self.scale_ = X.std(axis=0)\n",
           "            stats = X if eval_set is None else np.concatenate([X, np.asarray(eval_set[0], np.float32)])\n"
           "            self.mean_ = stats.mean(axis=0)\n            self.scale_ = stats.std(axis=0)\n",
           ("tests/test_fit.py::test_linear_head_standardizes_with_its_training_rows_only",)),
    Mutant("tuned-std-with-test", "the tuned protocol standardizes with train statistics", "fusion_cache/selection.py",
           "    mean, scale = train_statistics(data.X_train)\n",
           "    mean, scale = train_statistics(np.concatenate([data.X_train, data.X_test]))\n",
           ("tests/test_selection.py::test_the_tuned_heads_standardize_with_train_statistics_only",)),
    Mutant("wd-chosen-on-fit-rows", "the weight decay is chosen on validation rows", "fusion_cache/selection.py",
           "            tried[h, seed][i] = float(correct[splits[seed][1], g].mean())\n",
           "            tried[h, seed][i] = float(correct[splits[seed][0], g].mean())\n",
           ("tests/test_selection.py::test_validation_decides_where_the_fit_rows_would_choose_otherwise",)),
    Mutant("k-chosen-on-fit-rows", "kNN's k is chosen on validation rows", "fusion_cache/selection.py",
           "    by_k = probe.score_ks(data.X_train[val_rows], data.y_train[val_rows], ks)\n",
           "    by_k = probe.score_ks(data.X_train[fit_rows], data.y_train[fit_rows], ks)\n",
           ("tests/test_selection.py::test_validation_decides_where_the_fit_rows_would_choose_otherwise",)),
    Mutant("grid-tie-to-last", "a tie on validation goes to the strongest strength (first)", "fusion_cache/selection.py",
           "            chosen.append((h, seed, max(acc, key=lambda i: (acc[i], -i))))",
           "            chosen.append((h, seed, max(acc, key=lambda i: (acc[i], i))))",
           ("tests/test_selection.py::test_each_choice_is_the_first_best_validation_accuracy_recomputed_here",)),
    Mutant("logreg-binary-C", "the tuned logreg's C is scikit-learn's C on two classes", "fusion_cache/selection.py",
           "binary = 2.0 if k == 2 else 1.0", "binary = 1.0",
           ("tests/test_selection.py::test_the_tuned_logreg_on_two_classes_is_scikit_learns_at_the_same_C",)),
    # -- the subset sampler
    Mutant("sampler-smallest-remainder", "extra rows go to the largest remainders", "fusion_cache/sampler.py",
           "np.lexsort((np.arange(len(classes)), -remainder))", "np.lexsort((np.arange(len(classes)), remainder))",
           ("tests/test_reliability.py::test_stratified_sampler_counts_by_largest_remainder",)),
    Mutant("sampler-ties-reversed", "equal remainders go to the earlier class", "fusion_cache/sampler.py",
           "np.lexsort((np.arange(len(classes)), -remainder))", "np.lexsort((-np.arange(len(classes)), -remainder))",
           ("tests/test_reliability.py::test_stratified_sampler_counts_by_largest_remainder",)),
    # -- image conversion
    Mutant("rgba-on-black", "transparent pixels are composited on white", "fusion_cache/decode.py",
           'background = Image.new("RGBA", im.size, (255, 255, 255, 255))',
           'background = Image.new("RGBA", im.size, (0, 0, 0, 255))', ("tests/test_images.py",)),
    Mutant("sixteen-bit-scale", "16-bit gray scales by 255 / 65535", "fusion_cache/decode.py",
           'top = 65535.0 if im.mode.startswith("I;16")', 'top = 65536.0 if im.mode.startswith("I;16")',
           ("tests/test_images.py",)),
    Mutant("sixteen-bit-truncated", "16- and 32-bit gray round to the nearest level", "fusion_cache/decode.py",
           "np.clip(arr / top * 255.0 + 0.5, 0, 255)", "np.clip(arr / top * 255.0, 0, 255)", ("tests/test_images.py",)),
    Mutant("float-image-truncated", "float images round to the nearest level", "fusion_cache/decode.py",
           "np.clip(arr * 255.0 + 0.5, 0, 255)", "np.clip(arr * 255.0, 0, 255)", ("tests/test_images.py",)),
    # -- how files become pixels: EXIF orientation, reduced decoding
    Mutant("exif-ignored", "a file's EXIF orientation is applied (upright, as a person sees it)",
           "fusion_cache/decode.py", "ImageOps.exif_transpose(im, in_place=True)", "None",
           ("tests/test_decode.py::test_an_exif_rotated_jpeg_extracts_as_the_rotated_image",
            "tests/test_decode.py::test_exif_orientation_gives_the_physically_rotated_pixels")),
    Mutant("reduce-margin-one", "reduced decoding keeps the shorter side at least REDUCE_MARGIN x image_size",
           "fusion_cache/decode.py", "min(size) // (REDUCE_MARGIN * reduce_to)", "min(size) // reduce_to",
           ("tests/test_decode.py::test_reduced_decoding_keeps_the_margin_and_no_more",
            "tests/test_decode.py::test_reduced_network_input_is_close_to_the_full_decode")),
    # -- the layer curve
    Mutant("layer-curve-late", "each point of the layer curve is its own tap", "fusion_cache/compare.py",
           "        data = load_view(cache, tap)\n", '        data = load_view(cache, "late")\n',
           ("tests/test_compare.py::test_each_point_of_the_layer_curve_is_its_tap_alone",)),
    # -- what the cache holds: every tap, at its scale, at the requested precision
    Mutant("tap-deep-zero", "every tap is stored, the deep ones too", "fusion_cache/engines/core.py",
           "{t: v.astype(self.meta.dtype, copy=False) for t, v in feats.items()}",
           "{t: (np.zeros_like(v) if t in ('features.14', 'features.15', 'features.16', 'features.17', "
           "'features.18') else v).astype(self.meta.dtype, copy=False) for t, v in feats.items()}",
           ("tests/test_extract.py::test_cached_features_equal_direct_forward",)),
    Mutant("tap-late-zero", "every backbone's late tap is stored", "fusion_cache/engines/core.py",
           "{t: v.astype(self.meta.dtype, copy=False) for t, v in feats.items()}",
           "{t: (np.zeros_like(v) if t == self.meta.table.views['late'][0] else v).astype(self.meta.dtype, "
           "copy=False) for t, v in feats.items()}",
           ("tests/test_backbones.py::test_extract_fit_predict_export[resnet18]",
            "tests/test_backbones.py::test_extract_fit_predict_export[timm:deit_tiny_patch16_224]")),
    Mutant("tap-vector-x2", "vector taps are stored at their own scale", "fusion_cache/backbone.py",
           "out[t] = f.flatten(1)", "out[t] = 2 * f.flatten(1)",
           ("tests/test_backbones.py::test_extract_fit_predict_export[timm:deit_tiny_patch16_224]",)),
    Mutant("bf16-runs-fp32", "--precision bf16 runs the forward pass in bf16", "fusion_cache/engines/core.py",
           "enabled=dtype is not None)", "enabled=False)",
           ("tests/test_extract.py::test_bf16_and_float16_are_close_to_fp32_and_never_reused_for_each_other",)),
    Mutant("workers-decode-otherwise", "worker processes decode as the main process does", "fusion_cache/engines/core.py",
           "return position, self.pre.resize(self.sp.image(position)), None, None",
           "return position, self.pre.resize(self.sp.image(position)).flip(-1) if "
           "torch.utils.data.get_worker_info() is not None else self.pre.resize(self.sp.image(position)), "
           "None, None",
           ("tests/test_extract.py::test_folder_decoded_in_worker_processes_is_bit_identical",)),
    # -- one plan, executed as planned
    Mutant("plan-bytes-unchecked", "every file's bytes are checked against the plan's digest", "fusion_cache/decode.py",
           "            if got != sha256:\n", "            if False:\n",
           ("tests/test_hostile_plan.py::test_other_bytes_under_a_planned_name_are_an_error_and_no_cache[local-bytes]",)),
    Mutant("manifest-link-resolved", "a linked manifest's relative paths start at the link's folder",
           "fusion_cache/extract.py", "data_root = Path.cwd() / cfg.data_root",
           "data_root = Path(cfg.data_root).resolve()",
           ("tests/test_hostile_plan.py::test_a_linked_manifest_reads_the_images_beside_the_link",)),
    # -- your folder as it is
    Mutant("split-by-name", "an image's side of the split follows its content, not its name", "fusion_cache/split.py",
           r'what = digest if is_content_digest(digest) else f"{digest}\0{name}"', "what = name",
           ("tests/test_folders.py::test_the_split_follows_the_seed_and_content_only",)),
    Mutant("split-moves-on-add", "adding images never moves existing ones", "fusion_cache/split.py",
           r'{seed}\n{what}".encode(', r'{seed}\n{what}{len(digests)}".encode(',
           ("tests/test_folders.py::test_adding_images_never_moves_existing_ones",)),
    Mutant("given-validation-ignored", "tuning chooses on the dataset's own val/ split", "fusion_cache/selection.py",
           "validation_split(data.y_train, val_fraction, seed, data.val_rows)",
           "validation_split(data.y_train, val_fraction, seed)",
           ("tests/test_folders.py::test_a_val_folder_beside_test_is_the_validation_split_tuning_uses",)),
    Mutant("leak-unseen", "test images whose content is in train are reported", "fusion_cache/leaks.py",
           "pairs = [(n, train[d]) for n, d in zip(names, digests) if d in train]", "pairs = []",
           ("tests/test_folders.py::test_leaks_and_duplicates_are_warned_recorded_and_shown",
            "tests/test_folders.py::test_on_leak_fail_stops_before_writing")),
    Mutant("older-cache-always-reused", "a schema-3 cache is reused only when decoding did not change",
           "fusion_cache/extract.py", "    return all(decodes_as_before(f, sp.reduce_to)",
           "    return True or all(decodes_as_before(f, sp.reduce_to)",
           ("tests/test_folders.py::test_an_older_cache_is_reused_only_when_decoding_did_not_change[True]",)),
    # -- your dataset as it ships
    Mutant("container-bytes-unchecked", "an item inside a container is checked against the plan's digest",
           "fusion_cache/engines/core.py", "sha256=self.digests[position], reduce_to=self.reduce_to)",
           "sha256=None, reduce_to=self.reduce_to)",
           ("tests/test_containers.py::test_changed_container_after_planning_is_never_extracted[parquet]",)),
    Mutant("container-not-reduced", "bytes in a container decode as the same bytes in a file", "fusion_cache/decode.py",
           "return _decode_checked(io.BytesIO(data), name, reduce_to)",
           "return _decode_checked(io.BytesIO(data), name, None)",
           ("tests/test_containers.py::test_the_same_bytes_give_bit_identical_features_in_every_container[wds-json]",)),
    Mutant("classlabel-ignored", "ClassLabel names from the HF features name the classes",
           "fusion_cache/sources/columns.py", 'if feat.get("_type") == "ClassLabel" and feat.get("names"):',
           "if False:",
           ("tests/test_containers.py::test_the_same_bytes_give_bit_identical_features_in_every_container[parquet]",)),
    Mutant("wds-label-key-ignored", "--label-key names the json field", "fusion_cache/sources/wds.py",
           "field = label_key or LABEL_FIELD", "field = LABEL_FIELD",
           ("tests/test_containers.py::test_wds_label_key_reads_another_member_or_json_field",)),
    Mutant("parquet-rereads", "items read in order stream through each row group once",
           "fusion_cache/sources/parquet.py",
           "if state is None or state[0] != (path, group) or row < state[1]:", "if True:",
           ("tests/test_containers.py::test_reader_streams_a_row_group_once_in_order",)),
    Mutant("wds-no-grouping", "a WebDataset sample is the members that share a key", "fusion_cache/sources/wds.py",
           "return (m[1], m[2].lower()) if m else (name, \"\")", "return (name, m[2].lower()) if m else (name, \"\")",
           ("tests/test_containers.py::test_the_same_bytes_give_bit_identical_features_in_every_container[wds-cls]",)),
    # -- intervals, paired tests and the ridge probe
    Mutant("bootstrap-seeds-fixed", "an interval resamples the runs as well as the images", "fusion_cache/stats.py",
           "r = rng.integers(0, runs, size=(b, runs)) if runs > 1 else np.zeros((b, 1), np.int64)",
           "r = np.tile(np.arange(runs), (b, 1))",
           ("tests/test_stats.py::test_two_level_interval_covers_a_run_level_random_effect",)),
    Mutant("holm-not-monotone", "Holm's adjusted p-values never decrease with the raw ones", "fusion_cache/stats.py",
           "np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))",
           "np.minimum(1.0, (m - np.arange(m)) * p[order])",
           ("tests/test_stats.py::test_holm_hand_worked_example",)),
    Mutant("ridge-alpha-per-sum", "ridge's alpha is a strength per training row", "fusion_cache/heads/ridge.py",
           "A = torch.from_numpy(zz + gram.n * alpha * np.eye(gram.d))", "A = torch.from_numpy(zz + alpha * np.eye(gram.d))",
           ("tests/test_ridge.py",)),
    Mutant("ridge-grid-unscaled", "every grid point of the ridge path is the head at that alpha",
           "fusion_cache/heads/ridge.py",
           "inv = 1.0 / (path.lam[:, None] + path.n * np.asarray(alphas)[None, :])",
           "inv = 1.0 / (path.lam[:, None] + np.asarray(alphas)[None, :])",
           ("tests/test_ridge.py",)),
    Mutant("best-row-on-test", "the report's best row (and its figures) is chosen on validation, never on test",
           "fusion_cache/report.py",
           "return max(self.tuned_summary, key=val)",
           "return max(self.tuned_summary, key=lambda s: s[\"test_acc_mean\"])",
           ("tests/test_report.py",)),
)


def check_list(root: Path = ROOT) -> list[str]:
    """Problems with the list itself: duplicate ids, texts that are not found exactly once, no-op mutants,
    test files that do not exist."""
    problems, seen = [], set()
    for m in MUTANTS:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        text = (root / m.file).read_text()
        count = text.count(m.old)
        if count != 1:
            problems.append(f"{m.id}: its text occurs {count} times in {m.file} (must be exactly once)")
        if m.old == m.new:
            problems.append(f"{m.id}: old and new are the same")
        if not m.tests:
            problems.append(f"{m.id}: no tests named")
        for t in m.tests:
            if not (root / t.split("::")[0]).is_file():
                problems.append(f"{m.id}: no test file {t.split('::')[0]}")
    return problems


def _pytest(scratch: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FUSION_CACHE_REAL_DATA", None)  # the real-data tests are not part of any mutant's selection
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", "-W",
           "ignore::pytest.PytestUnraisableExceptionWarning", *tests]
    try:
        p = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
    return p.returncode, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated mutant ids (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's test run")
    args = ap.parse_args(argv)
    if not args.timeout > 0:  # also refuses nan
        ap.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    problems = check_list()
    if problems:
        print("the mutant list is out of step with the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    chosen = list(MUTANTS)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {m.id for m in MUTANTS})
        if unknown:
            print(f"unknown mutant id(s): {', '.join(unknown)}; see --list", file=sys.stderr)
            return 2
        chosen = [m for m in MUTANTS if m.id in wanted]
    if args.list:
        for m in chosen:
            print(f"{m.id:<26} {m.file:<26} {m.rule}")
        return 0
    with tempfile.TemporaryDirectory(prefix="fc-mutants-") as tmp:
        scratch = Path(tmp) / "tree"
        scratch.mkdir()
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, scratch / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                shutil.copy2(src, scratch / name)
        # the unmutated tree must pass every selected test, or a "killed" mutant means nothing
        selected = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        start = time.perf_counter()
        rc, last = _pytest(scratch, selected, args.timeout * 2)
        print(f"baseline: {len(selected)} test selections, exit {rc} in {time.perf_counter() - start:.0f} s ({last})")
        if rc != 0:
            print("the unmutated tree fails its own tests; fix that first", file=sys.stderr)
            return 2
        rows, bad = [], 0
        print(f"{'mutant':<26} {'result':<9} {'s':>5}  rule")
        for m in chosen:
            path = scratch / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            start = time.perf_counter()
            try:
                rc, last = _pytest(scratch, m.tests, args.timeout)
            finally:
                path.write_text(original)
            seconds = time.perf_counter() - start
            # pytest: 1 = tests failed (the mutant is killed); 0 = all passed (it survived); other codes mean the
            # tests did not run as meant (collection error, no tests, timeout) and count as failures of the check
            result = {0: "SURVIVED", 1: "killed"}.get(rc, f"error {rc}")
            bad += result != "killed"
            rows.append((m, result, seconds, last))
            print(f"{m.id:<26} {result:<9} {seconds:5.0f}  {m.rule}", flush=True)
            if result != "killed":
                print(f"    {last}")
    killed = sum(r[1] == "killed" for r in rows)
    print(f"{killed} of {len(rows)} mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
