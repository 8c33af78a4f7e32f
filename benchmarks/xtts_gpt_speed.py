"""Seconds per generated audio code of the full-size XTTS-v2 GPT (30 layers x 1024, random weights), with the stop
flag read on the host every token (`sync_every=1`, the loop before issue 14) and every SYNC_EVERY tokens (the
accelerator default), interleaved in one run; optionally in bf16 too.

    python benchmarks/xtts_gpt_speed.py [--codes 40] [--repeats 3] [--precisions fp32 bf16] [--device cpu|cuda]
                                        [--small] [--out benchmarks/results/xtts_gpt_speed.json]

Greedy decoding with the upstream default repetition penalty; the stop code is disabled so that every mode generates
exactly --codes codes (no steps past a stop to trim: the figure is the cost of the per-token read alone). s/code is
the whole generate() call (prompt pass included) divided by --codes, best of --repeats; the load average is
recorded per run because the CPU may be shared. --small: the reduced fixture-sized GPT, a quick check.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: the repo root holds narrate_model
from narrate_model.xtts.config import XttsConfig  # noqa: E402
from narrate_model.xtts.gpt import SYNC_EVERY, XttsGPT  # noqa: E402
from narrate_model.xtts.model import PRECISIONS  # noqa: E402
from narrate_model.xtts.sampling import SamplingParams  # noqa: E402
from provenance import environment  # noqa: E402

SMALL_CONFIG = ROOT.parent / "shared" / "fixtures" / "xtts" / "small_config.json"


def timed(model, text, cond, codes: int, sync_every: int) -> dict:
    params = SamplingParams(do_sample=False, repetition_penalty=10.0, max_new_tokens=codes)
    load = os.getloadavg()[0]
    sync = torch.cuda.synchronize if text.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model.generate_batch([text[0]], cond, params, sync_every=sync_every)[0]
    sync()
    seconds = time.perf_counter() - t0
    if out.codes.shape[1] != codes:
        raise RuntimeError(f"{out.codes.shape[1]} codes generated, expected {codes}")
    return {"s_per_code": seconds / codes, "seconds": seconds, "load_avg_1min": round(load, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=40)
    ap.add_argument("--text-tokens", type=int, default=33)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=list(PRECISIONS))
    ap.add_argument("--small", action="store_true", help="the reduced fixture-sized GPT instead of the full size")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "xtts_gpt_speed.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = XttsConfig.from_json(SMALL_CONFIG) if args.small else XttsConfig.v2()
    base = XttsGPT(cfg).eval()
    with torch.no_grad():
        base.mel_head.bias[cfg.gpt_stop_audio_token] = float("-inf")  # never stop: time exactly --codes codes
    text = torch.randint(3, 5000, (1, args.text_tokens), device=args.device)
    modes = {"per_token_read (sync_every=1, before)": 1, f"sync_every={SYNC_EVERY} (after)": SYNC_EVERY}

    results = {}
    for precision in sorted(args.precisions, key=lambda p: p != "fp32"):  # cast in place: fp32 first
        model = base.to(args.device, PRECISIONS[precision])
        cond = torch.randn(1, 32, cfg.gpt_n_model_channels, device=args.device, dtype=PRECISIONS[precision])
        timed(model, text, cond, 3, 1)  # warm-up: first calls allocate and pick kernels
        runs = {mode: [] for mode in modes}
        for rep in range(args.repeats):  # interleaved, alternating order: both modes see the same load
            for mode in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):
                runs[mode].append(timed(model, text, cond, args.codes, modes[mode]))
                print(f"{precision} {mode} run {rep + 1}: {runs[mode][-1]['s_per_code']:.4f} s/code "
                      f"(load {runs[mode][-1]['load_avg_1min']})", flush=True)
        best = {mode: min(r["s_per_code"] for r in runs[mode]) for mode in modes}
        before, after = best.values()
        results[precision] = {"best_s_per_code": {m: round(v, 5) for m, v in best.items()},
                              "speed_up_after_vs_before": round(before / after, 3),
                              "runs": runs}
    if len(args.precisions) > 1 and "fp32" in results:
        fp32 = min(results["fp32"]["best_s_per_code"].values())
        for precision in results:
            results[precision]["speed_up_vs_fp32"] = round(fp32 / min(results[precision]["best_s_per_code"].values()),
                                                           3)

    report = {
        "what": f"XTTS-v2 GPT ({'reduced fixture size' if args.small else 'full size'}, random weights) greedy "
                f"s/code on {args.device}: the stop flag read every token (before) vs every {SYNC_EVERY} tokens "
                "(after), interleaved in one run, best of the repeats",
        "note": "On the CPU the flag already lives in host memory, so the per-token read costs no device wait; the "
                "ratio shows what is left (Python and dispatch overhead), not the GPU effect, where each read waits "
                "for the queued step to finish. The stop code is disabled, so both modes compute the same steps.",
        "settings": {"codes": args.codes, "text_tokens": args.text_tokens, "repeats": args.repeats,
                     "device": args.device, "small": args.small, "sync_every_after": SYNC_EVERY},
        "environment": environment(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for precision, r in results.items():
        print(precision, r["best_s_per_code"], f"after/before speed-up {r['speed_up_after_vs_before']}x",
              f"vs fp32 {r['speed_up_vs_fp32']}x" if "speed_up_vs_fp32" in r else "")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
