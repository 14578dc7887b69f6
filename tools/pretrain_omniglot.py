"""Meta-train, test and export the pretrained model shipped inside the package.

    python tools/pretrain_omniglot.py [--data_root ../shared/data/omniglot] [--minutes 75]
                                      [--max_steps 8250]
    python tools/pretrain_omniglot.py --export_only runs-pretrain/lightning_logs/version_0

What it runs: ``fewshot fit -c configs/omniglot_5way_1shot_cpu.yaml`` (second-order MAML,
conv4-64, Omniglot 5-way 1-shot, MAML's 1100/100/423 character split, 1 inner step of 0.4,
Adam 2e-3 cosine-annealed, 32 tasks per meta-batch; see the config for the rest) with
``--seed_everything 0`` for ``--minutes`` of wall time instead of the config's 20 and the
cosine schedule over ``--max_steps`` (default: 110 per minute, what this 2-core machine does
with that config) instead of the config's 2,200, keeping the checkpoint with the best validation accuracy (100
episodes every 250 iterations); then the 600 test episodes of the MAML split with that
checkpoint; then ``fewshot export`` into ``src/fewshot/pretrained/omniglot-5way-1shot/``, whose
model card records the config, seed, wall time, iterations and test accuracy. The package
ships that folder; ``fewshot.load("omniglot-5way-1shot")`` reads it. The model shipped now
was trained on 2026-12-01 with the config as it was then (no ``zero_head``, a constant rate,
3 inner steps at test): its ``fewshot.json`` records those settings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "omniglot_5way_1shot_cpu.yaml"
OUTPUT = REPO / "src" / "fewshot" / "pretrained" / "omniglot-5way-1shot"
SEED = 0
# Meta-iterations per minute of the CPU config on this project's 2-core machine (2,200 in 20
# minutes, README "Results"): sizes the cosine schedule to the time asked.
STEPS_PER_MINUTE = 110


def train(args) -> Path:
    root_dir = REPO / "runs-pretrain"
    before = set(root_dir.glob("lightning_logs/version_*"))
    command = [sys.executable, "-m", "fewshot", "fit", "-c", str(CONFIG),
               f"--data.root={args.data_root}", f"--seed_everything={SEED}",
               f"--trainer.max_time=00:{args.minutes // 60:02d}:{args.minutes % 60:02d}:00",
               f"--trainer.max_steps={args.max_steps or STEPS_PER_MINUTE * args.minutes}",
               "--test_after_fit=true", f"--trainer.default_root_dir={root_dir}",
               f"--trainer.logger.init_args.save_dir={root_dir}",
               "--trainer.enable_progress_bar=false"]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    wall = time.perf_counter() - start
    (run,) = set(root_dir.glob("lightning_logs/version_*")) - before
    (run / "pretrain.json").write_text(json.dumps({
        "command": command[1:], "config": CONFIG.name, "seed_everything": SEED,
        "minutes_asked": args.minutes, "wall_seconds": round(wall, 1)}, indent=2) + "\n")
    return run


def export(run: Path) -> None:
    training = json.loads((run / "pretrain.json").read_text())
    results = json.loads((run / "test_results.json").read_text())
    command = [sys.executable, "-m", "fewshot", "export", "--checkpoint", str(run),
               "--output", str(OUTPUT), "--training-note",
               (f"Meta-trained by tools/pretrain_omniglot.py: {training['config']}, "
                f"seed_everything {training['seed_everything']}, "
                f"{training['minutes_asked']} minutes asked, {training['wall_seconds'] / 60:.1f} "
                f"minutes of wall time for training and testing on a 2-core CPU; test accuracy "
                f"{100 * results['accuracy']:.2f} +- {100 * results['ci95']:.2f}% over "
                f"{results['episodes']} episodes.")]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", default=str(REPO.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--minutes", type=int, default=75)
    parser.add_argument("--max_steps", type=int, default=None,
                        help="meta-iterations the schedule spans (default: 110 per minute)")
    parser.add_argument("--export_only", type=Path, default=None,
                        help="export this finished run folder instead of training")
    args = parser.parse_args()
    run = args.export_only or train(args)
    export(run)


if __name__ == "__main__":
    main()
