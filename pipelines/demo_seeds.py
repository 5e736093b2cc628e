"""Is the demo model worth showing? `make demo`'s sample set and recipe, on several seeds.

    python pipelines/demo_seeds.py [--seeds 0,1,2,3,4] [--config configs/sample_ct.yaml] [--out DIR]

For each seed: the sample set written by ``medtl sample-data`` with that seed, then the demo recipe
(``configs/sample_ct.yaml``) trained with that seed, as ``make demo`` does (``medtl train --config ...``).
Prints one row per seed (test AUC, accuracy, test patients, seconds for data + training) and the worst
AUC; writes the rows to DIR/demo_seeds.csv.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

from medtl.config import load_config
from medtl.data import create_sample_data
from medtl.run import RunDir
from medtl.train import run_experiment


def one_seed(seed: int, config: Path, work: Path) -> dict:
    t0 = time.perf_counter()
    manifest = create_sample_data(work / f"sample_{seed}", seed=seed, force=True)
    cfg = load_config(config, data={"path": str(manifest)}, train={"seed": seed})
    run = RunDir(run_experiment(cfg, work / f"run_{seed}", force=True))
    test = run.read_json(RunDir.METRICS)["test"]
    return {
        "seed": seed,
        "test_auc": round(test["auc"], 4),
        "test_accuracy": round(test["accuracy"], 4),
        "test_patients": test["n_patients"],
        "test_images": test["n_images"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--config", type=Path, default=Path("configs/sample_ct.yaml"))
    p.add_argument("--out", type=Path, help="keep the sample sets, runs and demo_seeds.csv here (default: temporary)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for seed in seeds:
            rows.append(one_seed(seed, args.config, work))
            print("\t".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
        with open(work / "demo_seeds.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"worst test AUC {min(r['test_auc'] for r in rows):.3f} over {len(rows)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
