"""Pretrain the demo's small Llama on the Python documentation, at a short context (256 tokens).

    python -m longlora_hf.demo.pretrain --out longlora_hf/demo/assets [--steps 1500] [--source DIR]

Builds everything the demo ships: a byte-level BPE tokenizer (`tokenizer.json`), the model
(`model.safetensors`, `config.json`), the fine-tuning and held-out evaluation documents
(`finetune.jsonl.gz`, `eval.jsonl.gz`, never seen in pretraining), and `MODEL_CARD.md` recording the
corpus, sizes, steps, losses and the exact command. CPU only; deterministic for a given seed and
thread count.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..flags import add_flag
from ..metrics.perplexity import token_stream
from .corpus import DEFAULT_SOURCE, load_documents, split_documents, write_split


SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def model_config(tokenizer: PreTrainedTokenizerFast, context_length: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=context_length,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--steps", type=int, default=1500)
    add_flag(parser, "--batch_size", type=int, default=16)
    add_flag(parser, "--context_length", type=int, default=256)
    add_flag(parser, "--vocab_size", type=int, default=4096)
    add_flag(parser, "--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    command = "python -m longlora_hf.demo.pretrain " + " ".join(argv if argv is not None else sys.argv[1:])

    torch.manual_seed(args.seed)
    documents = load_documents(args.source)
    splits = split_documents(documents)
    args.out.mkdir(parents=True, exist_ok=True)
    write_split(args.out / "finetune.jsonl.gz", documents, splits["finetune"])
    write_split(args.out / "eval.jsonl.gz", documents, splits["eval"])

    pretrain_texts = [documents[name] for name in splits["pretrain"]]
    tokenizer = train_tokenizer(pretrain_texts, args.vocab_size)
    stream = token_stream(tokenizer, pretrain_texts)
    held_out = token_stream(tokenizer, [documents[name] for name in splits["eval"]])
    config = model_config(tokenizer, args.context_length)
    model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{len(splits['pretrain'])} pretraining documents, {stream.numel():,} tokens; {parameters:,} parameters")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    generator = torch.Generator().manual_seed(args.seed)
    window = args.context_length
    model.train()
    start, recent = time.time(), []
    for step in range(args.steps):
        offsets = torch.randint(0, stream.numel() - window, (args.batch_size,), generator=generator)
        batch = torch.stack([stream[o : o + window] for o in offsets.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        recent.append(loss.item())
        if (step + 1) % 50 == 0 or step == 0:
            print(
                f"step {step + 1}/{args.steps}  loss {sum(recent) / len(recent):.3f}  {time.time() - start:.0f}s",
                flush=True,
            )
            recent = []

    model.eval()
    with torch.no_grad():
        windows = held_out[: (held_out.numel() // window) * window].view(-1, window)[:64]
        held_out_loss = torch.stack([model(w[None], labels=w[None]).loss for w in windows]).mean().item()
    minutes = (time.time() - start) / 60
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    (args.out / "MODEL_CARD.md").write_text(
        CARD.format(
            parameters=f"{parameters:,}",
            documents=len(splits["pretrain"]),
            tokens=f"{stream.numel():,}",
            vocab=len(tokenizer),
            finetune=len(splits["finetune"]),
            eval=len(splits["eval"]),
            context=args.context_length,
            steps=args.steps,
            batch=args.batch_size,
            lr=args.learning_rate,
            seen=f"{args.steps * args.batch_size * window:,}",
            held_out_loss=held_out_loss,
            held_out_ppl=math.exp(held_out_loss),
            minutes=minutes,
            threads=torch.get_num_threads(),
            command=command,
            eval_names="\n".join(f"- {name}" for name in splits["eval"]),
        )
    )
    print(
        f"held-out loss {held_out_loss:.3f} (perplexity {math.exp(held_out_loss):.1f}) at {window} tokens; saved to "
        f"{args.out}"
    )
    return 0


CARD = """# longlora-hf demo model: a small Llama pretrained at {context} tokens

The base model of `longlora-hf demo`: small enough to ship, trained at a short context so the demo can
show what happens beyond it (perplexity at 1x-8x the training context, passkey retrieval), with
position interpolation alone, and with LongLoRA.

- Architecture: Llama (RoPE, theta 10000, no scaling), 4 layers, hidden 256, 8 query heads and 4
  key/value heads (GQA), MLP 688, tied input/output embeddings; {parameters} parameters; float32
  safetensors.
- Training context: {context} tokens (`max_position_embeddings`).
- Tokenizer: byte-level BPE, {vocab} tokens, trained on the pretraining split only (`tokenizer.json`).
- Corpus: the reStructuredText sources of the Python 3.11 documentation as Debian's `python3.11-doc`
  package installs them (`/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`), PSF licence. Split by
  `longlora_hf/demo/corpus.py`: {documents} pretraining documents ({tokens} tokens), {finetune} long
  documents for fine-tuning (`finetune.jsonl.gz`) and {eval} long held-out documents for evaluation
  (`eval.jsonl.gz`); neither of the last two is seen in pretraining.
- Training: {steps} steps of {batch} random windows of {context} tokens ({seen} tokens seen), AdamW
  (lr {lr}, betas 0.9/0.95, weight decay 0.1, 5% warm-up then cosine to 10%), gradient clipping 1.0,
  float32, CPU ({threads} threads), {minutes:.0f} minutes.
- Held-out loss at {context} tokens: {held_out_loss:.3f} (perplexity {held_out_ppl:.1f}), first 64
  windows of the evaluation documents.

Rebuild (after `apt-get install python3.11-doc`):

```
{command}
```

Held-out documents:
{eval_names}
"""


if __name__ == "__main__":
    sys.exit(main())
