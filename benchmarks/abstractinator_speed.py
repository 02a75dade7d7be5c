"""The Abstractinator against a byte-level language model of the same parameter count: scoring and generation speed.

- Scoring: `AbstractinatorModel.causal_bits` (every compressor, expander and the code LM, one pass each) on a batch of
  byte windows, against one forward pass of the peer, a byte-level `LlamaForCausalLM` (vocabulary 259, the experiment
  file's width, as many layers as give the Abstractinator's parameter count), on the same windows.
- Generation: `generate_bytes` (prompt -> codes -> the code LM's `generate()` -> the expander writes every byte,
  greedily) against the peer's `generate()` with its KV cache writing the same number of bytes after the same prompt.

Models at the sizes of `configs/experiments/abstractinator_shakespeare.yaml`: the trained one with `--output-dir` (a
finished run), else fresh weights (scoring speed does not depend on them; a fresh expander never ends a segment, so
it writes `--max-length` bytes). Writes benchmarks/results/abstractinator_speed.json.

    python benchmarks/abstractinator_speed.py [--output-dir outputs/abstractinator_shakespeare] [--batch 16]
"""

import argparse
from pathlib import Path

import torch
import yaml

from common import best_of, machine, write_results

REPO = Path(__file__).resolve().parents[1]


def load_model(output_dir):
    from hf_models.abstractinator import AbstractinatorConfig, AbstractinatorModel

    if output_dir:
        return AbstractinatorModel.from_pretrained(str(Path(output_dir) / "abstractinator")).eval()
    spec = yaml.safe_load((REPO / "configs" / "experiments" / "abstractinator_shakespeare.yaml").read_text())
    return AbstractinatorModel(AbstractinatorConfig(**spec["model"]["abstractinator"])).eval()


def byte_lm_like(model):
    """A byte-level Llama as wide as the first level, with the layer count that comes closest to `model`'s size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    level = model.config.compressor_level_configs[0]
    target = sum(p.numel() for p in model.parameters())

    def build(layers):
        return LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=level["hidden_size"], intermediate_size=level["intermediate_size"],
                                            num_hidden_layers=layers, num_attention_heads=level["num_attention_heads"],
                                            num_key_value_heads=level["num_attention_heads"], max_position_embeddings=4096,
                                            bos_token_id=256, eos_token_id=257, pad_token_id=258)).eval()

    one, two = (sum(p.numel() for p in build(n).parameters()) for n in (1, 2))
    layers = max(1, round((target - (one - (two - one))) / (two - one)))
    return build(layers)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default=None, help="a finished abstractinator run (default: fresh weights)")
    parser.add_argument("--batch", type=int, default=16, help="windows scored at once")
    parser.add_argument("--seq-len", type=int, default=256, help="bytes per scored window")
    parser.add_argument("--prompt", default="Now is the winter of our discontent\nMade glorious summer by this sun of York;\n")
    parser.add_argument("--new-codes", type=int, default=32, help="codes the code LM adds in generation")
    parser.add_argument("--max-length", type=int, default=512, help="the most bytes the expander writes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is robust on a shared 2-core machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.output_dir)
    peer = byte_lm_like(model)
    from hf_models.data.bytes import shakespeare_bytes

    data = shakespeare_bytes("test")
    windows = torch.tensor(list(data[: args.batch * args.seq_len]), dtype=torch.long).view(args.batch, args.seq_len)

    def score_hier():
        return model.causal_bits(windows)["bits"]

    def score_peer():
        with torch.no_grad():
            return peer(input_ids=windows).logits

    prompt = args.prompt.encode()

    def generate_hier():
        torch.manual_seed(0)
        return model.generate_bytes(prompt, max_new_codes=args.new_codes, do_sample=False, max_length=args.max_length)

    written = len(generate_hier())
    ids = torch.tensor([list(prompt)])

    def generate_peer():
        with torch.no_grad():
            return peer.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=written,
                                 min_new_tokens=written, use_cache=True, pad_token_id=258)

    t_score_hier = best_of(score_hier, args.repeats)
    t_score_peer = best_of(score_peer, args.repeats)
    t_gen_hier = best_of(generate_hier, args.repeats, warmup=False)
    t_gen_peer = best_of(generate_peer, args.repeats, warmup=False)
    scored = args.batch * args.seq_len
    result = {
        "benchmark": "abstractinator_speed",
        "device": "cpu",
        **machine(),
        "dtype": "float32",
        "weights": args.output_dir or "fresh",
        "abstractinator_parameters": sum(p.numel() for p in model.parameters()),
        "peer_parameters": sum(p.numel() for p in peer.parameters()),
        "peer_layers": peer.config.num_hidden_layers,
        "scored_bytes": scored,
        "score_seconds_abstractinator": t_score_hier,
        "score_seconds_peer": t_score_peer,
        "score_bytes_per_second_abstractinator": scored / t_score_hier,
        "score_bytes_per_second_peer": scored / t_score_peer,
        "score_ratio_peer_over_abstractinator": t_score_peer / t_score_hier,
        "generated_bytes": written,
        "new_codes": args.new_codes,
        "generate_seconds_abstractinator": t_gen_hier,
        "generate_seconds_peer": t_gen_peer,
        "generate_bytes_per_second_abstractinator": written / t_gen_hier,
        "generate_bytes_per_second_peer": written / t_gen_peer,
        "generate_ratio_peer_over_abstractinator": t_gen_peer / t_gen_hier,
    }
    write_results("abstractinator_speed", result)
    print(f"scoring {args.batch} x {args.seq_len} bytes: Abstractinator {t_score_hier:.3f} s, byte LM "
          f"({peer.config.num_hidden_layers} layers, {result['peer_parameters'] / 1e6:.2f} M against "
          f"{result['abstractinator_parameters'] / 1e6:.2f} M) {t_score_peer:.3f} s; ratio (peer / Abstractinator): "
          f"{t_score_peer / t_score_hier:.2f}")
    print(f"generating {written} bytes: Abstractinator {t_gen_hier:.3f} s, byte LM generate() with KV cache "
          f"{t_gen_peer:.3f} s; ratio (peer / Abstractinator): {t_gen_peer / t_gen_hier:.2f}")


if __name__ == "__main__":
    main()
