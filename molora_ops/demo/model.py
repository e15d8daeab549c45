"""The tiny GPT-2 base: token blocks, a seeded training loop shared with the adapters, and base pretraining."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass
class Blocks:
    """Token blocks [n, seq_len] per domain, train and held-out."""

    train: dict[str, torch.Tensor]
    heldout: dict[str, torch.Tensor]


def encode_blocks(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Encode documents, join them with EOS, and cut into non-overlapping blocks of seq_len tokens."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_blocks(corpora, tokenizer, seq_len: int) -> Blocks:
    train = {d: encode_blocks(c.train, tokenizer, seq_len) for d, c in corpora.items()}
    heldout = {d: encode_blocks(c.heldout, tokenizer, seq_len) for d, c in corpora.items()}
    return Blocks(train, heldout)


def tiny_gpt2(vocab_size: int, seq_len: int, n_layer: int = 4, n_embd: int = 128, n_head: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def train_lm(model, data: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int, device,
             desc: str, warmup: int | None = None, weight_decay: float = 0.0) -> list[float]:
    """Train `model` (only its parameters with requires_grad) on random blocks of `data` with AdamW and a
    warmup + cosine schedule. Seeded: the same seed gives the same batches. Returns the loss per step."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 10) if warmup is None else warmup

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)
    for _ in bar:
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        batch = data[idx].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", refresh=False)
    bar.close()
    model.eval()
    return losses


def mixed(blocks: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """All domains' training blocks together, in a seeded order (the 'general mix')."""
    data = torch.cat(list(blocks.values()))
    return data[torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))]


def pretrain_base(tokenizer, blocks: Blocks, *, seq_len: int, steps: int, batch_size: int, lr: float, seed: int,
                  device, n_layer: int, n_embd: int, n_head: int):
    torch.manual_seed(seed)
    model = tiny_gpt2(len(tokenizer), seq_len, n_layer=n_layer, n_embd=n_embd, n_head=n_head).to(device)
    start = time.perf_counter()
    losses = train_lm(model, mixed(blocks.train, seed), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                      device=device, desc="pretrain base", weight_decay=0.01)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {"steps": steps, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                   "seconds": time.perf_counter() - start}
