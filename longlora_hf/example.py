"""`longlora-hf example`: S2-Attn training of a tiny Llama on the CPU, end to end.

It builds a tiny Llama from a config (nothing is downloaded), switches it to `attn_implementation="s2"`,
trains it on a synthetic copy task at a sequence length of 256 (four groups of 64 tokens), and shows
that the loss falls and that evaluation runs exact dense attention (identical logits to "sdpa").
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .attention import use_s2_attention


def copy_task_batch(generator: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    """Rows made of a random block of 16 tokens repeated: later blocks are predictable from earlier ones."""
    block = torch.randint(4, vocab, (batch, 16), generator=generator)
    return block.repeat(1, length // 16)


def run_example(steps: int = 80, length: int = 256, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=length,
        use_cache=False,
    )
    model = LlamaForCausalLM(config)
    settings = use_s2_attention(model)
    group_size = settings.group_size_for(length)
    print(f"tiny Llama, {sum(p.numel() for p in model.parameters()):,} parameters, attn_implementation='s2'")
    print(f"sequence length {length}: group size {group_size}, {length // group_size} groups, shift {group_size // 2}")

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        ids = copy_task_batch(generator, 4, length, config.vocab_size)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 1 or step % 20 == 0:
            print(f"step {step:>3}  training loss (S2-Attn) {loss.item():.3f}")

    model.eval()
    ids = copy_task_batch(generator, 2, length, config.vocab_size)
    with torch.no_grad():
        s2_logits = model(ids).logits
        model.set_attn_implementation("sdpa")
        sdpa_logits = model(ids).logits
        eval_loss = model(ids, labels=ids).loss.item()
    identical = torch.equal(s2_logits, sdpa_logits)
    print(f"evaluation loss (dense attention) {eval_loss:.3f}; 's2' in eval mode identical to 'sdpa': {identical}")
    return {"losses": losses, "eval_loss": eval_loss, "eval_identical_to_sdpa": identical}


def register(subparsers) -> None:
    """`longlora-hf example`."""
    parser = subparsers.add_parser(
        "example", help="A short end-to-end S2-Attn training example   on a tiny model (CPU)."
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    run_example()
    return 0
