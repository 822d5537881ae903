"""Forget one owner's documents from a LoRA-fine-tuned GPT-2-style model, on the CPU in a minute or two.

A small GPT-2 (built from a config: no download) is first trained on text from a
synthetic language (its "pretraining"). It is then fine-tuned with LoRA adapters (the
``peft`` package) on documents of distinct owners, each owner's documents carrying a
phrase of their own that the model memorises; the store records only the trainable
adapter parameters, and ``OwnerBatchSampler`` keeps each owner's documents in one step
per epoch. One owner asks to be forgotten: ``unlearn.amnesiac(..., owners=[k])`` subtracts
their steps. Printed: the store's footprint against a full log of the whole model, and
perplexity on the forgotten documents, on the other owners' documents, and on held-out
documents — before, after, and for a model fine-tuned without the forgotten owner.

    pip install -e ".[llm]" && python examples/forget_document.py
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import LoraConfig, get_peft_model

import unlearn
from updatestore import OwnerBatchSampler, UpdateStore

VOCAB, LENGTH, PHRASE = 96, 48, 12


def language(seed: int) -> tuple[np.ndarray, np.random.Generator]:
    """A sparse Markov chain: each token prefers four successors."""
    rng = np.random.default_rng(seed)
    probs = np.full((VOCAB, VOCAB), 0.02 / VOCAB)
    for t in range(VOCAB):
        probs[t, rng.choice(VOCAB, 4, replace=False)] += 0.98 / 4
    return probs / probs.sum(1, keepdims=True), rng


def text(probs: np.ndarray, rng: np.random.Generator, n: int) -> list[int]:
    out = [int(rng.integers(VOCAB))]
    for _ in range(n - 1):
        out.append(int(rng.choice(VOCAB, p=probs[out[-1]])))
    return out


def documents(probs, rng, owners: range, per_owner: int) -> tuple[torch.Tensor, np.ndarray]:
    """Each owner's documents: the language, with the owner's own phrase inserted at a random place."""
    docs, keys = [], []
    for owner in owners:
        phrase = rng.integers(VOCAB, size=PHRASE).tolist()
        for _ in range(per_owner):
            body = text(probs, rng, LENGTH - PHRASE)
            at = int(rng.integers(0, LENGTH - PHRASE))
            docs.append(body[:at] + phrase + body[at:])
            keys.append(owner)
    return torch.tensor(docs), np.array(keys)


def perplexity(model, docs: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=docs, labels=docs).loss.item()
    model.train()
    return math.exp(loss)


def pretrain(probs, rng, steps: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    corpus = torch.tensor([text(probs, rng, LENGTH) for _ in range(320)])
    for s in range(steps):
        batch = corpus[torch.randint(0, len(corpus), (16,), generator=torch.Generator().manual_seed(s))]
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    return model


def lora(base) -> torch.nn.Module:
    torch.manual_seed(1)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                        fan_in_fan_out=True)  # GPT-2's Conv1D layers store weights transposed
    import copy

    return get_peft_model(copy.deepcopy(base), config)


def fine_tune(model, docs: torch.Tensor, owners: np.ndarray, ids: np.ndarray, epochs: int, store=None) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    sampler = OwnerBatchSampler(owners, batch_size=4, seed=0)
    rec = store.recorder(model, opt).attach() if store is not None else None
    for _ in range(epochs):
        for batch in sampler:
            x = docs[batch]
            if rec is not None:
                with rec.batch(ids[batch]):
                    opt.zero_grad()
                    model(input_ids=x, labels=x).loss.backward()
                    opt.step()
            else:
                opt.zero_grad()
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
    if rec is not None:
        rec.detach()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--owners", type=int, default=10)
    p.add_argument("--docs-per-owner", type=int, default=4)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--keep", type=float, default=1.0, help="fraction of each adapter tensor's update kept")
    p.add_argument("--value-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--forget", type=int, default=3, help="the owner key to forget")
    p.add_argument("--store", type=Path, default=None, help="where to write the store (default: a temp dir)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    probs, rng = language(0)
    base = pretrain(probs, rng, args.pretrain_steps)
    docs, owners = documents(probs, rng, range(args.owners), args.docs_per_owner)
    held_out, _ = documents(probs, rng, range(100, 104), args.docs_per_owner)
    ids = np.arange(len(docs)) + 10_000  # each document's sample ID
    gone = owners == args.forget

    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or Path(tmp) / "lora.zarr"
        model = lora(base)
        with UpdateStore.create(path, model, keep=args.keep, value_dtype=args.value_dtype, overwrite=True) as store:
            store.index_owners(ids, owners)
            fine_tune(model, docs, owners, ids, args.epochs, store)
            before = [perplexity(model, d) for d in (docs[gone], docs[~gone], held_out)]
            fp = store.footprint()
            report = unlearn.amnesiac(model, store, owners=[args.forget], device="cpu")
            after = [perplexity(model, d) for d in (docs[gone], docs[~gone], held_out)]
            steps = store.num_batches

        reference = lora(base)  # the retrained-without reference: same base, same seeds, without the owner
        fine_tune(reference, docs[~gone], owners[~gone], ids[~gone], args.epochs)
        ref = [perplexity(reference, d) for d in (docs[gone], docs[~gone], held_out)]

    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    full_log_model = 4 * total * steps  # a dense float32 copy of every step's update of the whole model
    print(f"LoRA fine-tuning: {adapter:,} adapter parameters recorded of {total:,} ({100 * adapter / total:.1f} %), "
          f"{steps} steps, keep {args.keep} {args.value_dtype}")
    print(f"update store: {fp.total_bytes / 2**20:.2f} MiB on disk; full log of the adapters "
          f"{fp.full_log_bytes / 2**20:.2f} MiB; full log of the whole model {full_log_model / 2**20:.1f} MiB "
          f"({full_log_model / fp.total_bytes:.0f}x the store)")
    print(f"forgot owner {args.forget}: {int(gone.sum())} documents, {report.steps_hit.size} of {steps} steps "
          f"subtracted")
    print(f"{'perplexity':<28}{'forgotten docs':>15}{'other owners':>14}{'held-out':>10}")
    for name, row in (("before unlearning", before), ("after unlearning", after),
                      ("retrained without the owner", ref)):
        print(f"{name:<28}" + "".join(f"{v:>{w}.2f}" for v, w in zip(row, (15, 14, 10))))
    print(f"(perplexity of the uniform guess: {VOCAB}); {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
