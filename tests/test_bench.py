"""The benchmark runs end to end on tiny synthetic data and writes every key. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

KEYS = ("extract_vs_backbone_ratio", "extract_vs_backbone_ratio_resnet50", "extract_vs_backbone_ratio_vit_small",
        "extract_vs_folded_backbone_ratio", "ray_vs_local_ratio", "jpeg_decode_checked_vs_plain_ratio",
        "imagefolder_vs_backbone_ratio", "photos_vs_backbone_ratio", "photos_full_decode_vs_backbone_ratio",
        "ablation_speedup", "ablation_speedup_same_backbone", "head_vs_logreg_time_ratio",
        "head_vs_logreg_acc_delta", "rss_ratio", "bf16_speedup", "bf16_acc_delta", "float16_cache_size_ratio",
        "float16_cache_acc_delta", "tuned_grid_vs_one_fit", "tuned_vs_sklearn_grid", "tuned_vs_sklearn_acc_delta",
        "knn_seconds_full", "parquet_vs_imagefolder_ratio", "wds_vs_imagefolder_ratio", "parquet_rss_ratio",
        "wds_rss_ratio", "ridge_grid_vs_one_fit", "ridge_rss_600_vs_300", "logreg_time_600_vs_300")
SCRIPT = Path(__file__).parents[1] / "scripts" / "bench.py"


def test_bench_smoke(tmp_path, cifar_root, weights_file, tiny_cache):
    out = tmp_path / "bench.json"
    script = Path(__file__).parents[1] / "scripts" / "bench.py"
    r = subprocess.run([sys.executable, str(script), "--data-root", str(cifar_root), "--weights", str(weights_file),
                        "--skip-integrity-check", "--train-size", "30", "--test-size", "20", "--image-size", "32",
                        "--batch-size", "8", "--views", "early,fused", "--seeds", "0", "--rss-images", "120",
                        "--backbone-train-size", "10", "--backbone-test-size", "10", "--backbone-repeats", "1",
                        "--workers", "0", "--photos", "6", "--photo-size", "640x480", "--photo-image-size", "32",
                        "--container-rss-images", "200", "--scaling-rows", "300,600", "--scaling-width", "16",
                        "--scaling-heads", "ridge,logreg",
                        "--full-cache", str(tiny_cache), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(res[key], float) and math.isfinite(res[key]), key
        assert key in r.stdout  # the printed table
    assert res["rss_images"] == {"small": 12, "large": 120}  # 100 + 20, and a tenth of each
    assert res["float16_cache_bytes"]["float16"] < res["float16_cache_bytes"]["float32"]
    assert res["versions"]["torch"] and res["machine"]["cores"] and res["machine"]["cpu"]
    assert res["runs"][0]["machine"]["cpu"] and "extract_vs_backbone_ratio" in res["runs"][0]["keys"]
    assert not list(tmp_path.glob("*.tmp"))
    assert res["ray_vs_local_max_rel_diff"] < 1e-5 and res["ray_shards"] >= 1  # the same features, sharded
    assert res["photos"] == 6 and res["photo_size"] == [640, 480]
    assert res["container_rss_images"] == {"small": 20, "large": 100}  # the tiny CIFAR-10 holds 100 train images


def test_bench_heads_scaling(tmp_path):
    """--only-heads-scaling and --only-ridge on tiny synthetic caches, through the real `fusion-cache fit`
    subprocesses, merged into an existing --out; they read no images, so they need no --data-root. Values are
    not judged; one head keeps it fast (the smoke test runs every head)."""
    from fusion_cache.heads import HEAD_SPECS

    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"earlier": 1.0}))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = subprocess.run([sys.executable, str(SCRIPT), "--only-heads-scaling", "--only-ridge", "--scaling-rows",
                        "600,300", "--scaling-width", "16", "--scaling-heads", "ridge", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["earlier"] == 1.0
    rows = res["heads_scaling"]
    assert [(row["head"], row["rows"], row["width"]) for row in rows] == [("ridge", 300, 16), ("ridge", 600, 16)]
    for row in rows:
        for key in ("fit_seconds", "wall_seconds", "peak_rss_mb", "test_acc"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] >= 0, key
    assert res["heads_scaling_setup"]["taps"] == ["features.1"] and res["heads_scaling_setup"]["dtype"] == "float16"
    for key in ("ridge_rss_600_vs_300", "ridge_time_600_vs_300", "ridge_grid_vs_one_fit", "ridge_grid_s",
                "ridge_linear_read_s", "ridge_linear_fit_s", "ridge_test_acc", "ridge_linear_test_acc"):
        assert isinstance(res[key], float) and math.isfinite(res[key]), key
    assert res["ridge_alpha"] in HEAD_SPECS["ridge"].grid
    grid = res["ridge_grid"]
    assert grid["grid_points"] == len(grid["val_scores"]) == 33 and grid["fit_rows"] + grid["val_rows"] == 600
    assert "| ridge | 300 | 16 |" in r.stdout and "ridge_rss_600_vs_300" in r.stdout
    assert "ridge_grid_vs_one_fit" in r.stdout
    assert not list(scratch.glob("fc-bench-*"))  # the synthetic caches went with their scratch folder


def test_bench_scaling_space(tmp_path):
    """Too little disk for the largest synthetic cache: one line, before anything is written."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--only-heads-scaling", "--scaling-rows", "100,1000000000000",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "GB free" in r.stderr and "--scaling-rows" in r.stderr
    assert not out.exists()
