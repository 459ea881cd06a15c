"""A small CLIP-format BPE vocabulary, trained here with `tokenizers` (no real CLIP vocabulary can be downloaded).

The layout follows OpenAI's `simple_tokenizer.py`, which produced the vocab.json/merges.txt every SD checkpoint ships:
the 256 byte-level symbols, the same 256 with `</w>` (end of word), one token per merge in merge order, then
`<|startoftext|>` and `<|endoftext|>` as the two highest ids. merges.txt starts with a `#version: 0.2` header.
"""

import random
from pathlib import Path

from diffrt.clip_bpe import BOS, EOS, write_clip_bpe

__all__ = ["BOS", "EOS", "build_clip_vocab"]

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
    """A CLIP-layout BPE of at most `vocab_size` tokens (the tiny text encoders' vocabulary) trained on a small prompt
    corpus, written to `folder` (vocab.json, merges.txt and the tokenizer configs)."""
    return write_clip_bpe(folder, _corpus(), vocab_size, pad_token)
