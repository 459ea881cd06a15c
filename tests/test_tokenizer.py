"""diffrt.tokenizer.CLIPTokenizer against transformers' CLIP tokenizers, on a CLIP-format BPE trained here.

transformers 5 (what CI installs) has one CLIPTokenizer, built on `tokenizers` (CLIPTokenizerFast is an alias of it).
The slow Python tokenizer of transformers 4 survives here as tests/clip_slow_reference.py; with
DIFFRT_TRANSFORMERS4_PATH pointing at a `pip install --target DIR "transformers<5" "tokenizers<0.23"
"huggingface_hub<1"`, the real 4.x tokenizers are compared too.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from diffrt.tokenizer import CLIPTokenizer
from tests.helpers.clip_slow_reference import SlowCLIPTokenizer
from tests.helpers.clip_vocab import BOS, EOS, build_clip_vocab

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "   ",
    "A PHOTO OF A CAT, Highly Detailed, 8K",
    "masterpiece, best quality, (cinematic lighting:1.2), [blurry], {cat|dog} --no text!!!",
    "wow!  really?! yes... ok;;; a/b\\c <tag> ~tilde~ @home #1 $5 50% ^_^ & * + = |pipe|",
    "don't it's we're they've i'm you'll she'd can't WON'T Isn't o'clock rock'n'roll 'quoted' ''double''",
    "café naïve résumé crème brûlée façade jalapeño Zürich STRASSE straße",
    "e\u0301le\u0300ve (decomposed accents)",
    "東京の夜景 猫 風景写真 桜の山",
    "한국어 텍스트 日本語のテキスト ไทย Ελληνικά красивый пейзаж",
    "emoji 🐱🌸✨ 🎨👍🏽 👨\u200d👩\u200d👧 flags 🇫🇷",
    "numbers 1024x768 3.14159 2nd 1st 10,000 007 ½ ² ٣",
    "tabs\tand\nnewlines\r\n and   many     spaces \u00a0nbsp \u3000ideographic",
    "zero\u200bwidth soft\u00adhyphen control\x07bell \x00nul \ufffd replacement",
    "curly \u201cquotes\u201d and \u2018apostrophes\u2019 \u2014 dash \u2026 ellipsis",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "İstanbul ΣΊΣΥΦΟΣ ǅungla ß ﬁ ligature",
    "a <|endoftext|> b <|startoftext|> c",
    "an extremely long prompt " + " ".join(f"word{i} detail" for i in range(60)),
    "cat " * 75,
    "cat " * 76,
]
# Where transformers 4's slow tokenizer without ftfy (BasicTokenizer) departs from the fast one, which we follow:
# it puts spaces around every CJK ideograph (9, 10), deletes control/format characters such as U+200D, U+200B,
# U+00AD, BEL, NUL and U+FFFD (11, 14), and lower-cases with Python's final-sigma rule, "ΣΟΣ" -> "σος" (17).
SLOW_DIFFERS = {9, 10, 11, 14, 17}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip_vocab")
    eos = build_clip_vocab(root / "sd15", pad_token=EOS)  # SD1's tokenizer pads with <|endoftext|>
    bang = build_clip_vocab(root / "sdxl_2", pad_token="!")  # SD2's and SDXL's tokenizer_2 pad with "!" (id 0)
    # SD2's folders disagree with themselves: tokenizer_config.json says <|endoftext|>, special_tokens_map.json "!"
    sd2 = root / "sd21"
    shutil.copytree(bang, sd2)
    config = json.loads((sd2 / "tokenizer_config.json").read_text())
    (sd2 / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": EOS}))
    return {"sd15": eos, "sdxl_2": bang, "sd21": sd2}


def _ours(folder: Path) -> list[list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the over-long prompts warn; checked in test_truncation_warns
        return CLIPTokenizer.from_pretrained(folder)(PROMPTS).tolist()


def _mismatches(ours: list[list[int]], reference: list[list[int]]) -> set[int]:
    return {i for i, (a, b) in enumerate(zip(ours, reference, strict=True)) if a != b}


@pytest.mark.parametrize("kind", ["sd15", "sdxl_2", "sd21"])
@pytest.mark.parametrize("class_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_ids_match_transformers(folders, kind, class_name):
    import transformers

    reference = getattr(transformers, class_name).from_pretrained(str(folders[kind]))
    expected = [reference(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROMPTS]
    ours = _ours(folders[kind])
    assert all(len(row) == 77 for row in ours)
    # transformers < 5 still has the slow Python CLIPTokenizer; its known departures are checked below.
    allowed = set() if reference.is_fast else SLOW_DIFFERS
    assert _mismatches(ours, expected) == allowed, [(i, PROMPTS[i]) for i in _mismatches(ours, expected) - allowed]


@pytest.mark.parametrize("kind", ["sd15", "sdxl_2", "sd21"])
def test_ids_vs_transformers4_slow_tokenizer(folders, kind):
    slow = SlowCLIPTokenizer(folders[kind])
    assert _mismatches(_ours(folders[kind]), [slow(p) for p in PROMPTS]) == SLOW_DIFFERS


@pytest.mark.skipif(not os.environ.get("DIFFRT_TRANSFORMERS4_PATH"), reason="DIFFRT_TRANSFORMERS4_PATH is not set")
def test_ids_vs_installed_transformers4(folders):
    script = (
        "import json, sys\n"
        "from transformers import CLIPTokenizer, CLIPTokenizerFast\n"
        "prompts = json.load(sys.stdin)\n"
        "out = {}\n"
        "for cls in (CLIPTokenizer, CLIPTokenizerFast):\n"
        "    t = cls.from_pretrained(sys.argv[1])\n"
        "    assert getattr(t, 'fix_text', None) is None, 'ftfy is installed there'\n"
        "    out[cls.__name__] = [t(p, padding='max_length', max_length=77, truncation=True).input_ids"
        " for p in prompts]\n"
        "json.dump(out, sys.stdout)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.environ["DIFFRT_TRANSFORMERS4_PATH"]}
    for kind, folder in folders.items():
        run = subprocess.run([sys.executable, "-c", script, str(folder)], input=json.dumps(PROMPTS), env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        got = json.loads(run.stdout)
        ours = _ours(folder)
        assert _mismatches(ours, got["CLIPTokenizerFast"]) == set(), kind
        assert _mismatches(ours, got["CLIPTokenizer"]) == SLOW_DIFFERS, kind
        assert [SlowCLIPTokenizer(folder)(p) for p in PROMPTS] == got["CLIPTokenizer"], kind


def test_pad_token_per_folder(folders):
    sd15, sdxl_2, sd21 = (CLIPTokenizer.from_pretrained(folders[k]) for k in ("sd15", "sdxl_2", "sd21"))
    assert sd15.pad_token_id == sd15.eos_token_id == sd15.vocab_size - 1
    assert sd15.bos_token_id == sd15.vocab_size - 2
    assert sdxl_2.pad_token_id == 0 and sd21.pad_token_id == 0  # special_tokens_map.json wins, as in transformers
    empty = sd15("").tolist()[0]
    assert empty == [sd15.bos_token_id, sd15.eos_token_id] + [sd15.eos_token_id] * 75
    assert sdxl_2("").tolist()[0] == [sdxl_2.bos_token_id, sdxl_2.eos_token_id] + [0] * 75
    # "!" being a special token makes every "!" id 0, with no end-of-word "!</w>" (as transformers does).
    assert sdxl_2.tokenize("wow!") != sd15.tokenize("wow!") and sdxl_2("wow!")[0, 3] == 0


def test_truncation_warns(folders):
    tok = CLIPTokenizer.from_pretrained(folders["sd15"])
    n = len(tok.encode(PROMPTS[-1])) - 2
    assert n == 76 and len(tok.encode(PROMPTS[-2])) - 2 == 75  # "cat</w>" is one token of the trained vocab
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits = tok(PROMPTS[-2])  # exactly 75 tokens: no warning
    with pytest.warns(UserWarning, match=r"prompt 1 has 76 tokens .* its last 1 tokens were dropped: 'cat'"):
        ids = tok([PROMPTS[-2], PROMPTS[-1]])
    assert torch.equal(ids[1], fits[0])
    long = PROMPTS[-3]
    dropped = len(tok.encode(long)) - 77
    with pytest.warns(UserWarning, match=rf"its last {dropped} tokens were dropped"):
        ids = tok(long)
    assert ids.shape == (1, 77) and ids[0, -1] == tok.eos_token_id
    assert ids[0].tolist() == tok.encode(long)[:76] + [tok.eos_token_id]
    with pytest.warns(UserWarning, match="last 3 tokens"):
        assert tok("cat " * 8, max_length=7).shape == (1, 7)


def test_decode_round_trip(folders):
    tok = CLIPTokenizer.from_pretrained(folders["sd15"])
    text = "a photo of an astronaut riding a horse on mars, highly detailed"
    assert tok.decode(tok(text)[0]) == "a photo of an astronaut riding a horse on mars , highly detailed"


def test_tokenizer_json_only_folder(folders, tmp_path):
    """transformers 5's save_pretrained writes tokenizer.json and no vocab.json/merges.txt."""
    from transformers import CLIPTokenizer as Reference

    Reference.from_pretrained(str(folders["sdxl_2"])).save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    assert _ours(tmp_path) == _ours(folders["sdxl_2"])


def test_bad_folders(tmp_path, folders):
    with pytest.raises(ValueError, match="does not exist"):
        CLIPTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="neither vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(folders["sd15"], bad)
    (bad / "merges.txt").write_text("#version: 0.2\ni n\na b c\n")
    with pytest.raises(ValueError, match=r"line 3: a merge is two symbols"):
        CLIPTokenizer.from_pretrained(bad)
    (bad / "merges.txt").write_text("#version: 0.2\n")
    (bad / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": "<|end|>"}))
    (bad / "added_tokens.json").write_text(json.dumps({"<|end|>": 5000}))
    with pytest.raises(ValueError, match=r"'<\|end\|>' is declared with id 5000 but lands at id"):
        CLIPTokenizer.from_pretrained(bad)
    (bad / "special_tokens_map.json").write_text("{oops")
    with pytest.raises(ValueError, match="special_tokens_map.json is not valid JSON"):
        CLIPTokenizer.from_pretrained(bad)
