"""`diffrt train text`: the caption tokenizer (CLIP BPE files) and the CLIP text encoder's pretraining.

Tokenizer: byte-level BPE trained with the `tokenizers` library on captions of the grammar, written in the layout of
OpenAI's simple_tokenizer that every SD checkpoint ships: the 256 byte symbols, the same with `</w>`, one token per
merge, then <|startoftext|> and <|endoftext|> as the two highest ids (so the encoder pools at argmax(ids)).

Text encoder: a small CLIPTextModel, pretrained to state each label of its caption (diffrt.train.shapes.HEADS) from
its pooled output, i.e. supervised by the dataset's exact labels instead of contrastively against images, which the
exact labels make unnecessary. The UNet stage then fine-tunes it jointly at a lower learning rate, so the pretraining
only has to give it a sensible start. Captions come from the "train" split only: held-out pairs are never seen.
"""

import json
import os

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn

from diffrt.models.clip import CLIPTextConfig, CLIPTextModel
from diffrt.presets import _bytes_to_unicode
from diffrt.tokenizer import CLIP_PATTERN, CLIPTokenizer
from diffrt.train import checkpoint as ck
from diffrt.train import shapes
from diffrt.train.data import StepBatches
from diffrt.train.export import save_component
from diffrt.train.recipes import StageSettings, read_run

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CORPUS_SIZE = 20_000


def train_tokenizer(folder: str, vocab_limit: int, seed: int = 0) -> CLIPTokenizer:
    """Train a CLIP-layout BPE on captions of seeds seed*10**8 + 0..CORPUS_SIZE-1 and write it to `folder`."""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
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
        vocab_size=vocab_limit,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    base = seed * 10**8
    tok.train_from_iterator([shapes.caption(shapes.labels_of(base + i)) for i in range(CORPUS_SIZE)], trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]
    ]

    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols]
    known, kept = set(tokens), []
    for a, b in merges:  # CLIP's vocabulary holds one token per merge, each built from tokens before it
        if len(tokens) == vocab_limit - 2:
            break
        if a in known and b in known and a + b not in known:
            kept.append((a, b))
            tokens.append(a + b)
            known.add(a + b)
    tokens += [BOS, EOS]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    config = {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer", **special}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return CLIPTokenizer.from_pretrained(folder)


class LabelHeads(nn.Module):
    """One linear classifier per label head on the pooled text features (dropped after pretraining)."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleDict({h: nn.Linear(width, len(c)) for h, c in shapes.HEADS.items()})

    def loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy, share of captions with every head right)."""
        logits = {h: head(pooled) for h, head in self.heads.items()}
        loss = sum(F.cross_entropy(logits[h], labels[:, i]) for i, h in enumerate(shapes.HEADS))
        right = torch.stack([logits[h].argmax(-1) == labels[:, i] for i, h in enumerate(shapes.HEADS)], 1)
        return loss, right.all(1).float().mean()


def text_config(run: str, vocab_size: int) -> dict:
    return {**read_run(run).text, "vocab_size": vocab_size}


def train_text(run: str, s: StageSettings, device="cpu", workers=0, max_seconds=None, log=print, **kw) -> dict:
    arch = read_run(run)
    tok_dir = os.path.join(run, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "merges.txt")):
        train_tokenizer(tok_dir, arch.tokenizer_vocab, s.seed)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(s.seed)
    config = text_config(run, tok.vocab_size)
    encoder = CLIPTextModel(CLIPTextConfig.from_transformers(config)).to(device)
    heads = LabelHeads(encoder.config.hidden_size).to(device)
    opt = torch.optim.AdamW(ck.param_groups((list(encoder.parameters()) + list(heads.parameters()), s.lr)))
    data = StepBatches(s.seed, s.batch, arch.image_size, "train", images=False)

    def step(i: int) -> dict:
        _, captions, labels = data[i]
        out = encoder(tok(captions).to(device))
        loss, right = heads.loss(out.pooled, labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "all_right": right.item()}

    folder = os.path.join(run, "text")
    result = ck.run_loop(folder, s.as_dict(), {"text_encoder": encoder, "heads": heads}, opt, step,
                         save_every=kw.get("save_every", 500), max_seconds=max_seconds, log=log)  # fmt: skip
    if result["done"]:
        save_component(os.path.join(folder, "model"), config, encoder.state_dict())
    return result
