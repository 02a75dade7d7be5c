"""Next-frame emulation: autoregressive frame decoding against parallel, and generate() against a bare cached loop.

One `sample_next_frame` call of the thermalizer experiment's emulator size (CodeGPT 4 x 128, 8 x 8 codes of 256, random
weights) for a batch of frames, per decoding (`CodeGPTConfig.frame_decoding`): "parallel" draws the 64 codes from
one forward pass, "autoregressive" draws them one by one with `generate()` and its KV cache. The peer of the latter
is a plain loop over the model's forward with a `DynamicCache` (the same draws: checked), which shows how much of
the cost is `generate()`'s own. Ratios are printed; the figures go to benchmarks/results/frame_decoding.json.

    python benchmarks/frame_decoding.py [--batch 16] [--repeats 5] [--threads 1]
"""

import argparse

import torch
from transformers import DynamicCache

from common import best_of, machine, write_results
from hf_models.code_gpt import CodeGPTConfig, CodeGPTForCausalLM


def emulator(frame_decoding: str) -> CodeGPTForCausalLM:
    torch.manual_seed(0)
    config = CodeGPTConfig(codebook_size=256, num_classes=0, num_codes=64, class_dropout_prob=0.0, hidden_size=128,
                           intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=130, frame_decoding=frame_decoding)
    return CodeGPTForCausalLM(config).eval()


@torch.no_grad()
def cached_loop(model: CodeGPTForCausalLM, codes: torch.LongTensor, generator: torch.Generator) -> torch.LongTensor:
    """The autoregressive draw without `generate()`: prompt `[BOS] c_t [EOS]`, then one cached forward per code, each
    drawn over the whole vocabulary with the special tokens at probability 0 (as the pipeline's processors do)."""
    config = model.config
    out = model(input_ids=model.frame_prompt_ids(codes), past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    drawn = []
    for _ in range(config.num_codes):
        logits = out.logits[:, -1].float()
        logits[:, config.codebook_size:] = -float("inf")
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        drawn.append(token)
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(drawn, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="frames per call (the evaluation rolls out 16 at once)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is robust on a shared 2-core machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parallel, autoregressive = emulator("parallel"), emulator("autoregressive")
    codes = torch.randint(0, 256, (args.batch, 64), generator=torch.Generator().manual_seed(1))

    same = bool(torch.equal(autoregressive.sample_next_frame(codes, generator=torch.Generator().manual_seed(2)),
                            cached_loop(autoregressive, codes, torch.Generator().manual_seed(2))))
    seconds = {
        "parallel": best_of(lambda: parallel.sample_next_frame(codes, generator=torch.Generator().manual_seed(0)), args.repeats),
        "autoregressive_generate": best_of(
            lambda: autoregressive.sample_next_frame(codes, generator=torch.Generator().manual_seed(0)), args.repeats),
        "autoregressive_cached_loop": best_of(lambda: cached_loop(autoregressive, codes, torch.Generator().manual_seed(0)),
                                              args.repeats),
    }
    result = {
        "benchmark": "frame_decoding",
        "device": "cpu",
        **machine(),
        "batch": args.batch,
        "num_codes": 64,
        "parameters": sum(p.numel() for p in parallel.parameters()),
        "seconds_per_call": seconds,
        "frames_per_second": {k: args.batch / v for k, v in seconds.items()},
        "ratio_autoregressive_over_parallel": seconds["autoregressive_generate"] / seconds["parallel"],
        "ratio_generate_over_cached_loop": seconds["autoregressive_generate"] / seconds["autoregressive_cached_loop"],
        "same_draws_generate_and_cached_loop": same,
    }
    print(f"parallel {seconds['parallel'] * 1e3:.1f} ms, autoregressive with generate() "
          f"{seconds['autoregressive_generate'] * 1e3:.1f} ms, cached loop {seconds['autoregressive_cached_loop'] * 1e3:.1f} ms "
          f"per call of {args.batch} frames")
    print(f"autoregressive / parallel: {result['ratio_autoregressive_over_parallel']:.2f}x; generate() / cached loop: "
          f"{result['ratio_generate_over_cached_loop']:.2f}x (same draws: {same})")
    write_results("frame_decoding", result)


if __name__ == "__main__":
    main()
