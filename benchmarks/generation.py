"""CodeGPT sampling: generate() with the KV cache against full recomputation per token.

Both draw the same tokens for the same generator seed (checked); the ratio is the speed-up of
the cache. Writes benchmarks/results/generation.json.

    python benchmarks/generation.py [--batch 100] [--repeats 3]
"""

import argparse

import torch

from common import best_of, machine, write_results
from hf_models.code_gpt import CodeGPTConfig, CodeGPTForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--num_codes", type=int, default=49)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is robust on a shared 2-core machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # the demo's CodeGPT size (configs/experiments/code_image_mnist.yaml)
    config = CodeGPTConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, max_position_embeddings=64, codebook_size=256, num_classes=10, num_codes=args.num_codes)
    model = CodeGPTForCausalLM(config).eval()
    labels = torch.arange(args.batch) % 10

    def run(use_cache):
        return model.generate_codes(labels, generator=torch.Generator().manual_seed(0), use_cache=use_cache)

    outputs = {use_cache: run(use_cache) for use_cache in (True, False)}  # also the warm-up
    timings = {use_cache: best_of(lambda: run(use_cache), args.repeats, warmup=False) for use_cache in (True, False)}
    same = bool(torch.equal(outputs[True], outputs[False]))
    ratio = timings[False] / timings[True]
    tokens = args.batch * args.num_codes
    result = {
        "benchmark": "generation",
        "device": "cpu",
        **machine(),
        "dtype": "float32",
        "batch": args.batch,
        "num_codes": args.num_codes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "kv_cache_seconds": timings[True],
        "recompute_seconds": timings[False],
        "kv_cache_tokens_per_second": tokens / timings[True],
        "recompute_tokens_per_second": tokens / timings[False],
        "same_tokens": same,
        "ratio_recompute_over_cache": ratio,
    }
    write_results("generation", result)
    print(f"generate() with KV cache: {timings[True]:.3f} s, full recomputation: {timings[False]:.3f} s "
          f"for {args.batch} x {args.num_codes} codes; same tokens: {same}; speed-up (recompute / cache): {ratio:.2f}x")
    if not same:
        raise SystemExit("the cached and recomputed generations differ")


if __name__ == "__main__":
    main()
