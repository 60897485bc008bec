"""Build, offline, a random-init language-model folder with mamba-130m's config, a byte-level BPE tokenizer and a
text corpus: what the README's "Studying a pretrained language model" commands were verified on.

    python bench/make_random_lm.py OUT_DIR [--text-dir DIR] [--lines 5000] [--small]

Writes OUT_DIR/model (config.json, model.safetensors, tokenizer files) and OUT_DIR/corpus.txt (English sentences
taken from the comments and docstrings of the ``.py`` files under ``--text-dir``). The tokenizer is trained on
the corpus plus IOI-style sentences, so common names are single tokens. ``--small`` builds a 2-layer model instead.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import sysconfig
from pathlib import Path

NAMES = ("Mary", "John", "Alice", "Bob", "Paris", "France", "London", "store", "drink", "capital")


def corpus_lines(text_dir: Path, n: int, seed: int = 0) -> list[str]:
    lines = []
    for f in sorted(text_dir.glob("*.py")):
        for ln in f.read_text(errors="ignore").splitlines():
            ln = ln.strip().lstrip("#").strip()
            if len(ln) > 40 and re.fullmatch(r"[A-Za-z ,.;:'()\-]+", ln):
                lines.append(ln)
    random.Random(seed).shuffle(lines)
    return lines[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--text-dir", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                    help="a folder of .py files whose comments and docstrings become the corpus (default: stdlib)")
    ap.add_argument("--lines", type=int, default=5000)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast

    lines = corpus_lines(args.text_dir, args.lines)
    if len(lines) < 100:
        print(f"only {len(lines)} sentences found under {args.text_dir}; pass --text-dir with .py files",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "corpus.txt").write_text("\n".join(lines) + "\n")
    ioi = [f"When {a} and {b} went to the {w}, {b} gave a drink to {a}" for a in NAMES for b in NAMES for w in NAMES]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines + ioi * 3, trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = args.out / "model"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    size = dict(hidden_size=64, num_hidden_layers=2) if args.small else dict(hidden_size=768, num_hidden_layers=24)
    MambaForCausalLM(MambaConfig(vocab_size=50280, state_size=16, expand=2, **size)).save_pretrained(folder)
    print(f"{folder}: random-init Mamba ({size['num_hidden_layers']} layers, d_model {size['hidden_size']}), "
          f"tokenizer of {tok.get_vocab_size()} tokens; {args.out / 'corpus.txt'}: {len(lines)} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
