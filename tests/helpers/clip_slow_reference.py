"""transformers v4's slow Python CLIPTokenizer, as it runs without ftfy: a test reference only.

transformers v5 (what CI installs) dropped the slow tokenizer: its `CLIPTokenizer` is the `tokenizers`-backed one.
This is a transcription of the no-ftfy path of transformers 4.57.6 `models/clip/tokenization_clip.py` (BasicTokenizer
with strip_accents=False, do_split_on_punc=False, then CLIP's regex and a pure-Python BPE) plus the added-token
splitting of `PreTrainedTokenizer.tokenize`. It was checked id for id against the real 4.57.6 package on the prompts
of tests/test_tokenizer.py (the test re-checks when DIFFRT_TRANSFORMERS4_PATH points at such an install).
"""

import itertools
import json
import unicodedata
from pathlib import Path

import regex as re

_PAT = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", re.IGNORECASE
)
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _is_whitespace(c: str) -> bool:
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def _is_control(c: str) -> bool:
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _basic_tokenize(text: str) -> list[str]:
    """BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize."""
    text = "".join(" " if _is_whitespace(c) else c for c in text if not (ord(c) in (0, 0xFFFD) or _is_control(c)))
    text = "".join(f" {c} " if any(lo <= ord(c) <= hi for lo, hi in _CJK) else c for c in text)
    text = unicodedata.normalize("NFC", text)
    return " ".join(t.lower() for t in text.strip().split()).split()


class SlowCLIPTokenizer:
    def __init__(self, folder: Path):
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1 : 49152 - 256 - 2 + 1]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(lines)}
        special = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
        self.bos, self.eos, self.pad, self.unk = (
            special[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        )
        self.specials = sorted({self.bos, self.eos, self.pad, special["unk_token"]}, key=len, reverse=True)
        self.byte_encoder = _bytes_to_unicode()
        self.cache = {self.bos: self.bos, self.eos: self.eos}

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def _tokenize(self, text: str) -> list[str]:
        out = []
        for token in re.findall(_PAT, " ".join(_basic_tokenize(text))):
            out.extend(self._bpe("".join(self.byte_encoder[b] for b in token.encode("utf-8"))).split(" "))
        return out

    def __call__(self, text: str, max_length: int = 77) -> list[int]:
        """tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids"""
        tokens = []
        for chunk in re.split("(" + "|".join(map(re.escape, self.specials)) + ")", text):
            if chunk in self.specials:
                tokens.append(chunk)
            elif chunk:
                tokens.extend(self._tokenize(chunk))
        unk = self.encoder[self.unk]
        ids = [self.encoder.get(t, unk) for t in tokens][: max_length - 2]
        ids = [self.encoder[self.bos], *ids, self.encoder[self.eos]]
        return ids + [self.encoder[self.pad]] * (max_length - len(ids))
