"""The benchmark runs end to end on tiny synthetic data and writes every key. No timing is asserted."""

from __future__ import annotations

import json
import math
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
        "wds_rss_ratio")


def test_bench_smoke(tmp_path, cifar_root, weights_file, tiny_cache):
    out = tmp_path / "bench.json"
    script = Path(__file__).parents[1] / "scripts" / "bench.py"
    r = subprocess.run([sys.executable, str(script), "--data-root", str(cifar_root), "--weights", str(weights_file),
                        "--skip-integrity-check", "--train-size", "30", "--test-size", "20", "--image-size", "32",
                        "--batch-size", "8", "--views", "early,fused", "--seeds", "0", "--rss-images", "120",
                        "--backbone-train-size", "10", "--backbone-test-size", "10", "--backbone-repeats", "1",
                        "--workers", "0", "--photos", "6", "--photo-size", "640x480", "--photo-image-size", "32",
                        "--container-rss-images", "200",
                        "--full-cache", str(tiny_cache), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(res[key], float) and math.isfinite(res[key]), key
        assert key in r.stdout  # the printed table
    assert res["rss_images"] == {"small": 12, "large": 120}  # 100 + 20, and a tenth of each
    assert res["float16_cache_bytes"]["float16"] < res["float16_cache_bytes"]["float32"]
    assert res["versions"]["torch"] and res["machine"]["cpus"]
    assert not list(tmp_path.glob("*.tmp"))
    assert res["ray_vs_local_max_rel_diff"] < 1e-5 and res["ray_shards"] >= 1  # the same features, sharded
    assert res["photos"] == 6 and res["photo_size"] == [640, 480]
    assert res["container_rss_images"] == {"small": 20, "large": 100}  # the tiny CIFAR-10 holds 100 train images
