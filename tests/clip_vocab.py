"""A small CLIP-format BPE vocabulary, trained here with `tokenizers` (no real CLIP vocabulary can be downloaded).

The layout follows OpenAI's `simple_tokenizer.py`, which produced the vocab.json/merges.txt every SD checkpoint ships:
the 256 byte-level symbols, the same 256 with `</w>` (end of word), one token per merge in merge order, then
`<|startoftext|>` and `<|endoftext|>` as the two highest ids. merges.txt starts with a `#version: 0.2` header.
"""

import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# CLIP's pre-tokenizer pattern (OpenAI simple_tokenizer / transformers' CLIPTokenizer), used here only for training.
_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

_WORDS = (  # split into words in _corpus()
    "a photo of an astronaut riding a horse on mars highly detailed 8k trending on artstation portrait woman man "
    "cat dog castle mountain river forest sunset sunrise golden hour cinematic lighting octane render unreal engine "
    "concept art illustration oil painting watercolor by greg rutkowski alphonse mucha masterpiece best quality "
    "sharp focus intricate elegant digital painting smooth studio ghibli anime style cyberpunk city neon rain night "
    "reflections volumetric fog beautiful landscape ultra realistic photograph bokeh depth of field wide angle lens "
    "close up macro still life fruit bowl table wooden chair window light shadows dramatic clouds sky ocean waves "
    "don't it's we're they've i'm you'll she'd can't won't isn't café naïve résumé crème brûlée façade jalapeño "
    "zürich straße 東京 猫 風景 写真 桜 山 川 夜 красивый пейзаж 🐱 🌸 ✨ 🎨 1024 512 768 2 3 4 5 6 7 9 0 1st 2nd "
    "hello world (masterpiece:1.2) [blurry] {cat|dog} --no ... !!! ??? ~ @ # $ % ^ & * _ + = / \\ | < > ; : , ."
)


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = _WORDS.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in range(n_lines)]


def build_clip_vocab(folder: Path, pad_token: str = EOS, vocab_size: int = 1024) -> Path:
    """Train a CLIP-layout BPE of at most `vocab_size` tokens (the tiny text encoders' vocabulary) on a small prompt
    corpus; write vocab.json, merges.txt and the tokenizer configs."""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]
    ]

    byte_symbols = list(_bytes_to_unicode().values())  # CLIP's order: printable bytes first, so "!" is id 0
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    known = set(tokens)
    kept = []
    for a, b in merges:
        if len(tokens) == vocab_size - 2:
            break
        if a in known and b in known and a + b not in known:  # every merge builds on tokens already in the vocab
            kept.append((a, b))
            tokens.append(a + b)
            known.add(a + b)
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable-character table (openai/CLIP simple_tokenizer.py).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
