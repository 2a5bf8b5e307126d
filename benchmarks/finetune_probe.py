"""Benchmark (not a test): one fine-tune setting, judged quickly by the classifier distance.

Fine-tunes the base DiT into a DyDiT (or the static control) with the demo's settings changed by a
JSON of ``DemoConfig`` fields, samples it (sliced engine) and reports the Fréchet distance in the
Fashion-MNIST classifier's features and its accuracy on the samples, without Inception (fast).
Used to compare fine-tune recipes before a full `dydit demo` run.

Usage::

    python benchmarks/finetune_probe.py TAG '{"finetune_steps": 300, "ema_decay": 0.99}' [NUM_SAMPLES]
    # keys besides DemoConfig fields: "dynamic" (false: the static control), "base" (a DiT export)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dydit.apps.demo import BASE_CHECKPOINT, DemoConfig, finetune, load_dit, load_sliced_dydit, measure


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    tag, settings = sys.argv[1], json.loads(sys.argv[2])
    num_samples = int(sys.argv[3]) if len(sys.argv) == 4 else 500
    dynamic = settings.pop("dynamic", True)
    base = Path(settings.pop("base", str(BASE_CHECKPOINT)))
    cfg = DemoConfig(progress=False, num_samples=num_samples, inception=False, **settings)
    out = Path("runs/probe") / tag
    ckpt = finetune(cfg, base, out, dynamic=dynamic)
    model = load_sliced_dydit(ckpt, cfg.device) if dynamic else load_dit(ckpt, cfg.device)
    r = measure(tag, model, cfg, out / "samples.npz")
    row = {"tag": tag, **settings, "seconds": round(r.seconds, 1), "macs_attn_mlp": r.macs_attn_mlp}
    print(json.dumps({**row, **{k: round(v, 3) for k, v in r.metrics.items()}}))


if __name__ == "__main__":
    main()
