"""TokCom generation against autoregressive generation of the same number of tokens.

TokComPipeline draws a whole window in `num_inference_steps` denoiser passes over the latents plus one parallel VAE
decode; the peer is the reference LM (transformers' Qwen2ForCausalLM at the experiment file's size) drawing the same
number of tokens one by one with `generate()` and its KV cache. Models at the sizes of
`configs/experiments/tokcom_shakespeare.yaml` with fresh weights (speed does not depend on what the weights learned),
or the trained ones with `--output-dir`. Writes benchmarks/results/tokcom_generation.json.

    python benchmarks/tokcom_generation.py [--batch 16] [--steps 50] [--output-dir outputs/tokcom_shakespeare]
"""

import argparse
from pathlib import Path

import torch
import yaml

from common import best_of, machine, write_results

REPO = Path(__file__).resolve().parents[1]


def fresh_models(vocab_size: int, seq_len: int):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from tokenizers import Tokenizer, models

    from hf_models.pipelines import TokComPipeline
    from hf_models.tokcom import TokComDenoiserConfig, TokComDenoiserModel, TokComVAEConfig, TokComVAEModel

    spec = yaml.safe_load((REPO / "configs" / "experiments" / "tokcom_shakespeare.yaml").read_text())["model"]
    vae = TokComVAEModel(TokComVAEConfig(vocab_size=vocab_size, **spec["vae"])).eval()
    num_chunks = seq_len // vae.config.chunk_size
    den = TokComDenoiserModel(TokComDenoiserConfig(latent_size=vae.config.latent_size, max_chunks=num_chunks, **spec["denoiser"])).eval()
    reference = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, **spec["reference_lm"])).eval()
    vocab = {f"t{i}": i for i in range(vocab_size)}  # timing only: any tokenizer with this vocabulary size
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0")
    pipe = TokComPipeline(vae=vae, denoiser=den, scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=tokenizer)
    return pipe, reference


def trained_models(output_dir: str):
    from transformers import AutoModelForCausalLM

    from hf_models.pipelines import TokComPipeline

    pipe = TokComPipeline.from_pretrained(output_dir)
    reference = AutoModelForCausalLM.from_pretrained(str(Path(output_dir) / "reference_lm")).eval()
    return pipe, reference


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (the experiment file's data.seq_len)")
    parser.add_argument("--steps", type=int, default=50, help="TokCom Euler steps (the experiment file's evaluation setting)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is robust on a shared 2-core machine")
    parser.add_argument("--output-dir", default=None, help="a finished tokcom run (default: fresh weights)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe, reference = trained_models(args.output_dir) if args.output_dir else fresh_models(8192, args.seq_len)
    pipe.set_progress_bar_config(disable=True)
    chunk = pipe.vae.config.chunk_size
    if args.seq_len % chunk:
        raise SystemExit(f"--seq-len {args.seq_len} is not a multiple of the VAE's chunk_size {chunk}")

    def tokcom():
        return pipe(batch_size=args.batch, num_chunks=args.seq_len // chunk, num_inference_steps=args.steps,
                    generator=torch.Generator().manual_seed(0), output_type="pt").token_ids

    prompt = torch.zeros(args.batch, 1, dtype=torch.long)  # one start token; seq_len - 1 new tokens

    def autoregressive():
        with torch.no_grad():
            return reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=args.seq_len - 1,
                                      min_new_tokens=args.seq_len - 1, use_cache=True, pad_token_id=0)

    assert tokcom().shape == (args.batch, args.seq_len) and autoregressive().shape == (args.batch, args.seq_len)
    t_tokcom = best_of(tokcom, args.repeats, warmup=False)
    t_ar = best_of(autoregressive, args.repeats, warmup=False)
    tokens = args.batch * args.seq_len
    result = {
        "benchmark": "tokcom_generation",
        "device": "cpu",
        **machine(),
        "dtype": "float32",
        "weights": args.output_dir or "fresh",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "num_inference_steps": args.steps,
        "tokcom_parameters": sum(p.numel() for p in pipe.vae.parameters()) + sum(p.numel() for p in pipe.denoiser.parameters()),
        "reference_parameters": sum(p.numel() for p in reference.parameters()),
        "tokcom_seconds": t_tokcom,
        "autoregressive_seconds": t_ar,
        "tokcom_tokens_per_second": tokens / t_tokcom,
        "autoregressive_tokens_per_second": tokens / t_ar,
        "ratio_autoregressive_over_tokcom": t_ar / t_tokcom,
    }
    write_results("tokcom_generation", result)
    print(f"TokCom ({args.steps} steps): {t_tokcom:.3f} s, autoregressive generate() with KV cache: {t_ar:.3f} s for "
          f"{args.batch} x {args.seq_len} tokens; ratio (autoregressive / TokCom): {t_ar / t_tokcom:.2f}")


if __name__ == "__main__":
    main()
