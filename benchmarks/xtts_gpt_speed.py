"""Seconds per generated audio code of the full-size XTTS-v2 GPT (30 layers x 1024, random weights).

    python benchmarks/xtts_gpt_speed.py [--codes 50] [--text-tokens 33] [--threads N] [--device cpu|cuda]

Greedy decoding with the upstream default repetition penalty; the stop token is disabled so exactly --codes codes
are generated. Prints the prefill time (prompt pass) and the mean time per code over the whole generate() call.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds narrate_model
from narrate_model.xtts.config import XttsConfig  # noqa: E402
from narrate_model.xtts.gpt import XttsGPT  # noqa: E402
from narrate_model.xtts.sampling import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=50)
    ap.add_argument("--text-tokens", type=int, default=33)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = XttsConfig.v2()
    model = XttsGPT(cfg).eval().to(args.device)
    with torch.no_grad():
        model.mel_head.bias[cfg.gpt_stop_audio_token] = float("-inf")  # never stop: time exactly --codes codes
    text = torch.randint(3, 5000, (1, args.text_tokens), device=args.device)
    cond = torch.randn(1, 32, cfg.gpt_n_model_channels, device=args.device)
    params = SamplingParams(do_sample=False, max_new_tokens=args.codes)

    model.generate(text, cond, SamplingParams(do_sample=False, max_new_tokens=3))  # warm-up
    prefill = []
    per_code = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model.generate(text, cond, SamplingParams(do_sample=False, max_new_tokens=1))
        t1 = time.perf_counter()
        out = model.generate(text, cond, params)
        t2 = time.perf_counter()
        assert out.codes.shape[1] == args.codes
        prefill.append(t1 - t0)
        per_code.append((t2 - t1) / args.codes)
    print(f"device {args.device}, threads {torch.get_num_threads()}, prefix {32 + args.text_tokens + 2} positions")
    print(f"prefill (1 code)  : {min(prefill):.3f} s")
    print(f"per code ({args.codes} codes, incl. prefill): best {min(per_code):.4f} s, "
          f"mean {sum(per_code) / len(per_code):.4f} s")


if __name__ == "__main__":
    main()
