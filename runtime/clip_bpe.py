"""CLIP-layout BPE vocabulary files (vocab.json + merges.txt), trained with the `tokenizers` library.

The layout is OpenAI's simple_tokenizer.py, which produced the files every SD checkpoint ships: the 256 byte-level
symbols (printable bytes first, so "!" is id 0), the same 256 with `</w>` (end of word), one token per merge in merge
order, then `<|startoftext|>` and `<|endoftext|>` as the two highest ids. diffrt.tokenizer.CLIPTokenizer and
transformers' CLIPTokenizer both read what `write_clip_bpe` writes.
"""

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from diffrt.tokenizer import CLIP_PATTERN, END_OF_WORD

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in CLIP's vocabulary order (simple_tokenizer.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def base_vocabulary() -> list[str]:
    """CLIP's first 512 tokens: each byte's symbol, then the same with the end-of-word mark."""
    symbols = list(bytes_to_unicode().values())
    return symbols + [s + END_OF_WORD for s in symbols]


def write_clip_bpe(folder: str | Path, texts: Iterable[str], vocab_size: int, pad_token: str = EOS) -> Path:
    """Train a BPE of at most `vocab_size` tokens on `texts` with CLIP's normalisation and pre-tokenizer; write
    vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json to `folder`."""
    tok = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]
    ]
    tokens = base_vocabulary()
    known, kept = set(tokens), []
    for a, b in merges:  # CLIP's vocabulary holds one token per merge, each built from tokens before it
        if len(tokens) == vocab_size - 2:
            break
        if a in known and b in known and a + b not in known:
            kept.append((a, b))
            tokens.append(a + b)
            known.add(a + b)
    tokens += [BOS, EOS]

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
