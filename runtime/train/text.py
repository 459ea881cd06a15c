"""`diffrt train text`: the caption tokenizer (CLIP BPE files) and the CLIP text encoder's pretraining.

Tokenizer: byte-level BPE trained with the `tokenizers` library on captions of the grammar, written in the layout of
OpenAI's simple_tokenizer that every SD checkpoint ships: the 256 byte symbols, the same with `</w>`, one token per
merge, then <|startoftext|> and <|endoftext|> as the two highest ids (so the encoder pools at argmax(ids)).

Text encoder: a small CLIPTextModel, pretrained to state each label of its caption (diffrt.train.shapes.HEADS) from
its pooled output, i.e. supervised by the dataset's exact labels instead of contrastively against images, which the
exact labels make unnecessary. The UNet stage then fine-tunes it jointly at a lower learning rate, so the pretraining
only has to give it a sensible start. Captions come from the "train" split only: held-out pairs are never seen.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from diffrt.clip_bpe import write_clip_bpe
from diffrt.models.clip import CLIPTextConfig, CLIPTextModel
from diffrt.tokenizer import CLIPTokenizer
from diffrt.train import checkpoint as ck
from diffrt.train import shapes
from diffrt.train.data import CaptionIds, StepBatches
from diffrt.train.export import save_component
from diffrt.train.recipes import StageSettings, read_run

CORPUS_SIZE = 20_000


def train_tokenizer(folder: str, vocab_limit: int, seed: int = 0) -> CLIPTokenizer:
    """Train a CLIP-layout BPE on captions of seeds seed*10**8 + 0..CORPUS_SIZE-1 and write it to `folder`."""
    base = seed * 10**8
    captions = (shapes.caption(shapes.labels_of(base + i)) for i in range(CORPUS_SIZE))
    return CLIPTokenizer.from_pretrained(write_clip_bpe(folder, captions, vocab_limit))


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
    opt = ck.adamw(ck.param_groups((list(encoder.parameters()) + list(heads.parameters()), s.lr)), device)
    data = StepBatches(s.seed, s.batch, arch.image_size, "train", images=False)
    caption_ids = CaptionIds(tok)

    def step(i: int) -> dict:
        _, captions, labels = data[i]
        out = encoder(caption_ids(captions).to(device, non_blocking=True))
        loss, right = heads.loss(out.pooled, labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "all_right": right}

    folder = os.path.join(run, "text")
    result = ck.run_loop(folder, s.as_dict(), {"text_encoder": encoder, "heads": heads}, opt, step,
                         save_every=kw.get("save_every", 500), max_seconds=max_seconds, log=log)  # fmt: skip
    if result["done"]:
        save_component(os.path.join(folder, "model"), config, encoder.state_dict())
    return result
