"""CLIP's byte-level BPE tokenizer, built with the `tokenizers` library from a model folder's vocab.json + merges.txt.

The pipeline is the one transformers builds for `CLIPTokenizer` (v5) / `CLIPTokenizerFast` (v4): NFC, runs of
whitespace to one space, lower case; CLIP's word-splitting regex (openai/CLIP `simple_tokenizer.py`); byte-level
symbols; BPE with `</w>` marking the end of a word. The special tokens (bos, eos, unk, pad) are matched in the raw
text before all that, as transformers does, so SD2/SDXL tokenizers whose pad token is `!` turn every `!` of a prompt
into id 0. transformers v4's slow Python CLIPTokenizer without ftfy installed differs on runs of CJK ideographs
(it splits them into one word per character) and on control/format characters such as U+200D (it deletes them);
we follow the fast tokenizer, which is also what the OpenAI tokenizer that trained CLIP does on those.
"""

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

# openai/CLIP simple_tokenizer.py's pattern; the fast tokenizer matches it case-sensitively after lower-casing.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_DEFAULT_SPECIAL = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",  # SD1's tokenizer; SD2 and SDXL's tokenizer_2 say "!" in special_tokens_map.json
}


class CLIPTokenizer:
    """Prompt -> (batch, 77) token ids, padded and truncated the way diffusers' pipelines call CLIPTokenizer."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: str = _DEFAULT_SPECIAL["bos_token"],
        eos_token: str = _DEFAULT_SPECIAL["eos_token"],
        unk_token: str = _DEFAULT_SPECIAL["unk_token"],
        pad_token: str = _DEFAULT_SPECIAL["pad_token"],
        model_max_length: int = 77,
        added_tokens: Sequence[tuple[AddedToken, int]] = (),
    ):
        if model_max_length < 2:
            raise ValueError(f"model_max_length {model_max_length} leaves no room for the start and end tokens")
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token

        tok = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                continuing_subword_prefix="",
                end_of_word_suffix=END_OF_WORD,
                fuse_unk=False,
                unk_token=unk_token,
            )
        )
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        _add_tokens(tok, vocab, added_tokens, [bos_token, eos_token, unk_token, pad_token])
        self._tok = tok
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.pad_token_id = self._id(pad_token)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CLIPTokenizer":
        """Load a diffusers `tokenizer/` folder: vocab.json + merges.txt (or a tokenizer.json) and its configs."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"tokenizer folder {str(folder)!r} does not exist or is not a folder")
        config = _read_json(folder / "tokenizer_config.json")
        added: dict[str, tuple[AddedToken, int]] = {}
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            merges = _read_merges(folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():  # what transformers v5 save_pretrained writes instead
            full = _read_json(folder / "tokenizer.json")
            if full.get("model", {}).get("type") != "BPE":
                raise ValueError(f"{folder / 'tokenizer.json'} does not hold a BPE model, so it is no CLIP tokenizer")
            vocab = full["model"]["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in full["model"]["merges"]]
            for spec in full.get("added_tokens", []):
                added[spec["content"]] = (_added_token(spec), spec["id"])
        else:
            raise ValueError(f"{folder} has neither vocab.json + merges.txt nor tokenizer.json")

        for index, spec in config.get("added_tokens_decoder", {}).items():
            added[spec["content"]] = (_added_token(spec), int(index))
        for content, index in _read_json(folder / "added_tokens.json").items():
            added.setdefault(content, (AddedToken(content, special=False, normalized=True), index))

        # transformers lets special_tokens_map.json override tokenizer_config.json (SD2 relies on it for pad "!").
        special = dict(_DEFAULT_SPECIAL)
        for source in (config, _read_json(folder / "special_tokens_map.json")):
            for key in _SPECIAL_KEYS:
                if source.get(key) is not None:
                    value = source[key]
                    special[key] = value["content"] if isinstance(value, dict) else value
                    if isinstance(value, dict):
                        added[value["content"]] = (_added_token({**value, "special": True}), -1)
        max_length = int(config.get("model_max_length", 77))
        return cls(vocab, merges, model_max_length=max_length, added_tokens=list(added.values()), **special)

    def save_pretrained(self, folder: str | Path) -> list[str]:
        """Write `tokenizer.json` and `tokenizer_config.json` into `folder` (what `from_pretrained` reads back, as
        transformers v5 saves them); returns the file names written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_max_length": self.model_max_length, "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "unk_token": self.unk_token, "pad_token": self.pad_token}  # fmt: skip
        (folder / "tokenizer.json").write_text(self._tok.to_str())
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        return ["tokenizer.json", "tokenizer_config.json"]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[str]:
        """BPE tokens of one prompt, without start/end tokens."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        """Ids of one prompt with start and end tokens; neither truncated nor padded."""
        return [self.bos_token_id, *self._tok.encode(text, add_special_tokens=False).ids, self.eos_token_id]

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """(batch, max_length) int64 ids: start, up to max_length-2 prompt tokens, end, then pad tokens.

        Like `tokenizer(prompt, padding="max_length", truncation=True)` in diffusers' encode_prompt, a prompt too long
        keeps its first tokens; a warning says how many were dropped and what text they held.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_length = self.model_max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length {max_length} leaves no room for the start and end tokens")
        room = max_length - 2
        rows = []
        # One encode per prompt: encode_batch hands a batch to a thread pool, which costs a single prompt 0.3 ms
        # on the fast path's critical path (benchmarks/NOTES_latency.md, run 5).
        for i, encoding in enumerate(self._tok.encode(p, add_special_tokens=False) for p in prompts):
            ids = encoding.ids
            if len(ids) > room:
                warnings.warn(
                    f"prompt {i} has {len(ids)} tokens but the text encoder takes {room} (plus start and end), so "
                    f"its last {len(ids) - room} tokens were dropped: {self.decode(ids[room:])!r}",
                    stacklevel=2,
                )
                ids = ids[:room]
            row = [self.bos_token_id, *ids, self.eos_token_id]
            rows.append(row + [self.pad_token_id] * (max_length - len(row)))
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), max_length)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()

    def _id(self, token: str) -> int:
        index = self._tok.token_to_id(token)
        if index is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return index


def _add_tokens(
    tok: Tokenizer, vocab: dict[str, int], added: Sequence[tuple[AddedToken, int]], special: list[str]
) -> None:
    """Register added/special tokens so they are matched in the raw text; new ones must continue the vocab's ids."""
    tokens = {t.content: (t, i) for t, i in added}
    for content in special:
        if content not in tokens:
            tokens[content] = (AddedToken(content, special=True, normalized=False), -1)
    for token, declared in sorted(tokens.values(), key=lambda ti: vocab.get(ti[0].content, ti[1])):
        if token.special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        got = tok.token_to_id(token.content)
        if token.content in vocab and got != vocab[token.content]:
            raise ValueError(
                f"added token {token.content!r} has id {got} but the vocabulary says {vocab[token.content]}"
            )
        if declared >= 0 and got != declared:
            raise ValueError(
                f"added token {token.content!r} is declared with id {declared} but lands at id {got}; added tokens "
                f"outside vocab.json must number on from its {len(vocab)} entries without gaps"
            )


def _added_token(spec: dict) -> AddedToken:
    return AddedToken(
        spec["content"],
        single_word=spec.get("single_word", False),
        lstrip=spec.get("lstrip", False),
        rstrip=spec.get("rstrip", False),
        normalized=spec.get("normalized", not spec.get("special", False)),
        special=spec.get("special", False),
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    # Split on "\n" only: str.splitlines would also break at characters such as U+0085 inside a symbol.
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{path} line {n}: a merge is two symbols separated by one space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges
