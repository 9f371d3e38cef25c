"""Forge optd's demo model pair: a small Llama target and a smaller draft sharing one BPE tokenizer.

Both are trained on the source of the running interpreter's standard library (or --stdlib DIR); by a
hash of their path, --heldout-pct of the files are held out for the final evaluation and as many again
form a validation split, scored every --eval-every steps: each model keeps its best checkpoint (early
stopping; the corpus is small enough to overfit). The result is two plain Hugging Face checkpoints
(bf16 safetensors + tokenizer files) under OUT/target and OUT/draft, shipped as package data and
loaded as model="demo" / draft_model="demo-draft". The draft is distilled from the target so that it
agrees with it often (it serves speculative decoding).

    python bench/forge.py --out engine/demo --seed 0 --device auto      # the real run (GPU, ~5 min)
    python bench/forge.py --quick                                        # end-to-end check on CPU

Data order, initialisation and splits depend only on the seed. On CPU the same seed and software give
bit-identical weights; on CUDA, cuDNN's attention backward is not deterministic (torch warns), so GPU
reruns agree only up to float noise. --budget-s caps each model's step count to fit a wall-clock
budget, measured on its first steps; the counts used are printed, and passing them back with
--steps/--draft-steps (and no budget) replays the run. bench/RESULTS.md records the run that made
engine/demo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

EOT = "<|endoftext|>"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}# assistant:\n{% endif %}"
)
# (hidden, layers, heads, kv heads, SwiGLU width); head_dim is 64. "demo" is the bundled pair; "large"
# is the biggest pair worth training in a few GPU minutes, for bench/spec.py (never committed).
SIZES = {
    "demo": {"target": (320, 6, 5, 1, 864), "draft": (192, 2, 3, 1, 512)},
    "large": {"target": (768, 16, 12, 4, 2048), "draft": (256, 2, 4, 1, 704)},
    # A deeper target makes a draft step cheap beside a target step (which is what speculation needs
    # at batch 1); the draft stays at 2 layers, as its cost is kernel launches, not width.
    "xl": {"target": (1024, 24, 16, 4, 2816), "draft": (512, 2, 8, 2, 1408)},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (default engine/demo)")
    p.add_argument("--stdlib", type=Path, default=None, help="corpus root (default: this interpreter's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=sorted(SIZES), default="demo", help="model sizes (see SIZES)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--steps", type=int, default=3500, help="target optimizer steps")
    p.add_argument("--draft-steps", type=int, default=3000, help="draft optimizer steps")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (draft: 1.5x)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--heldout-pct", type=float, default=2.0)
    p.add_argument("--distill", type=float, default=0.7, help="weight of KL(target||draft) in draft loss")
    p.add_argument("--budget-s", type=float, default=0.0, help="wall-clock cap for training (0: none)")
    p.add_argument("--eval-windows", type=int, default=0, help="windows scored (0: all held-out, 64 val)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=250, help="validation every N steps; best is kept")
    p.add_argument("--quick", action="store_true", help="few steps on a small slice, for a CPU check")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.draft_steps, a.batch, a.seq, a.vocab = 12, 12, 4, 256, 1024
        a.warmup, a.log_every, a.eval_every, a.eval_windows = 4, 4, 6, 4
        a.out = a.out or Path("/tmp/optd-forge-quick")
    a.out = a.out or Path(__file__).resolve().parents[1] / "engine" / "demo"
    return a


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def collect_corpus(root: Path, heldout_pct: float) -> tuple[list[str], list[str], list[str]]:
    """Standard-library .py files that parse on this interpreter: train, validation and held-out
    splits by a hash of the path relative to the stdlib root."""
    train, val, heldout = [], [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compile(text, rel, "exec", dont_inherit=True)  # drops py2 fixtures and deliberately bad files
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 10_000
        cut = heldout_pct * 100
        (heldout if bucket < cut else val if bucket < 2 * cut else train).append(text)
    return train, val, heldout


def train_tokenizer(texts: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, min_frequency=2, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # Like Llama 3: encoding with special tokens puts BOS first; the model saw EOT before every file.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1", special_tokens=[(EOT, tok.token_to_id(EOT))]
    )
    return tok


def encode_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream: EOT, file, EOT, file, ... (EOT serves as BOS and EOS)."""
    ids = [i for enc in tok.encode_batch(texts, add_special_tokens=True) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)


def make_model(size: str, kind: str, vocab: int, seed: int, context: int) -> LlamaForCausalLM:
    """`context` is the training window: positions past it were never trained, so say so in config.json."""
    hidden, layers, heads, kv_heads, inter = SIZES[size][kind]
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64,
        max_position_embeddings=context, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on accelerators; plain fp32 on CPU, where bf16 matmuls are slow."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type != "cpu")


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, held: torch.Tensor, seq: int, windows: int) -> float:
    n = min(windows, (len(held) - 1) // seq)
    w = held[torch.arange(n)[:, None] * seq + torch.arange(seq + 1)].to(model.device)
    with autocast(model.device):
        logits = model(input_ids=w[:, :-1]).logits.float().flatten(0, 1)
    return F.cross_entropy(logits, w[:, 1:].reshape(-1)).item()


def train(name: str, model: LlamaForCausalLM, data: torch.Tensor, val: torch.Tensor, steps: int,
          args: argparse.Namespace, device: torch.device, peak_lr: float, budget_s: float,
          teacher: LlamaForCausalLM | None = None) -> tuple[int, int]:
    """Train `model` on random windows of `data`; with a teacher, mix CE with KL(teacher || model).
    Keeps the weights with the best validation loss; returns (steps run, best step)."""
    model.to(device).train()
    data = data.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=peak_lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed + (1 if teacher is not None else 0))
    span = torch.arange(args.seq + 1)
    amp = autocast(device)
    t0 = time.perf_counter()
    t_probe, loss_sum, n_sum, step = 0.0, 0.0, 0, 0
    best, best_step, best_state = math.inf, 0, None
    while step < steps:
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        window = data[(starts[:, None] + span).to(device)]
        x, y = window[:, :-1], window[:, 1:].reshape(-1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.warmup, peak_lr)
        with amp:
            logits = model(input_ids=x).logits.float().view(-1, model.config.vocab_size)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=x).logits.float().view(-1, model.config.vocab_size)
                kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1),
                              log_target=True, reduction="batchmean")
                loss = (1 - args.distill) * loss + args.distill * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_sum, n_sum = loss_sum + loss.item(), n_sum + 1
        if budget_s > 0 and step == 10:
            t_probe = time.perf_counter()
        if budget_s > 0 and step == 40:  # cap the schedule to the budget, measured on steps 10..40
            per_step = (time.perf_counter() - t_probe) / 30
            fit = max(step, int((budget_s - (time.perf_counter() - t0)) / per_step) + step)
            if fit < steps:
                print(f"[{name}] {per_step * 1e3:.0f} ms/step: capping {steps} -> {fit} steps", flush=True)
                steps = fit
        if step % args.log_every == 0 or step == steps:
            el = time.perf_counter() - t0
            tps = step * args.batch * args.seq / el
            lr = opt.param_groups[0]["lr"]
            print(f"[{name}] step {step}/{steps} loss {loss_sum / n_sum:.4f} lr {lr:.2e} "
                  f"{el:.0f}s {tps / 1e3:.0f}k tok/s", flush=True)
            loss_sum, n_sum = 0.0, 0
        if step % args.eval_every == 0 or step == steps:
            model.eval()
            v = heldout_loss(model, val, args.seq, args.eval_windows or 64)
            if v < best:
                best, best_step = v, step
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
            print(f"[{name}] step {step} validation loss {v:.4f} (best {best:.4f} @{best_step})", flush=True)
            model.train()
    model.eval()
    if best_state is not None:
        model.load_state_dict(best_state)
    return steps, best_step


@torch.no_grad()
def evaluate(target: LlamaForCausalLM, draft: LlamaForCausalLM, data: torch.Tensor, n_bytes: int,
             args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Held-out per-token perplexity of both, bits per byte, and draft/target top-1 agreement."""
    n_win = (len(data) - 1) // args.seq
    if args.eval_windows:
        n_win = min(n_win, args.eval_windows)
    nll = {"target": 0.0, "draft": 0.0}
    agree = hit = count = 0
    for i in range(0, n_win, 8):
        idx = torch.arange(i, min(i + 8, n_win))[:, None] * args.seq + torch.arange(args.seq + 1)
        w = data[idx].to(device)
        x, y = w[:, :-1], w[:, 1:].reshape(-1)
        with autocast(device):
            lt = target(input_ids=x).logits.float().flatten(0, 1)
            ld = draft(input_ids=x).logits.float().flatten(0, 1)
        nll["target"] += F.cross_entropy(lt, y, reduction="sum").item()
        nll["draft"] += F.cross_entropy(ld, y, reduction="sum").item()
        agree += (lt.argmax(-1) == ld.argmax(-1)).sum().item()
        hit += (lt.argmax(-1) == y).sum().item()
        count += y.numel()
    scale = n_bytes * count / (len(data) - 1)  # bytes covered by the scored tokens, pro rata
    return {
        "tokens": count,
        "target_ppl": math.exp(nll["target"] / count), "draft_ppl": math.exp(nll["draft"] / count),
        "target_bpb": nll["target"] / math.log(2) / scale, "draft_bpb": nll["draft"] / math.log(2) / scale,
        "target_top1": hit / count, "draft_agreement": agree / count,
    }


def save(model: LlamaForCausalLM, tok: Tokenizer, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.to("cpu", torch.bfloat16).save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg.setdefault("rope_theta", 10000.0)  # for readers that predate transformers 5's rope_parameters
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "pad_token": EOT,
        "unk_token": None, "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({k: EOT for k in ("bos_token", "eos_token",
                                                                          "pad_token")}, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # save_pretrained may write 0600; package data must be world-readable


def sample(model: LlamaForCausalLM, tok: Tokenizer, prompt: str, n: int = 60) -> str:
    ids = torch.tensor([tok.encode(prompt).ids], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return prompt + tok.decode(out[0, ids.shape[1]:].tolist())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    seed_everything(args.seed)
    t0 = time.perf_counter()
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    stdlib = args.stdlib or Path(sysconfig.get_paths()["stdlib"])
    train_texts, val_texts, heldout_texts = collect_corpus(stdlib, args.heldout_pct)
    if args.quick:
        train_texts, val_texts, heldout_texts = train_texts[:60], val_texts[:4], heldout_texts[:4]
    print(f"corpus {stdlib}: {len(train_texts)} train files ({sum(map(len, train_texts)) / 1e6:.1f}M chars), "
          f"{len(val_texts)} validation, {len(heldout_texts)} held out", flush=True)
    tok = train_tokenizer(train_texts, args.vocab)
    data, held = encode_stream(tok, train_texts), encode_stream(tok, heldout_texts)
    val = encode_stream(tok, val_texts)
    held_bytes = sum(len(t.encode()) for t in heldout_texts)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, train {len(data) / 1e6:.2f}M tokens, held-out "
          f"{len(held) / 1e3:.0f}k tokens ({held_bytes / len(held):.2f} bytes/token) "
          f"[{time.perf_counter() - t0:.0f}s]", flush=True)

    budget = args.budget_s
    target = make_model(args.size, "target", tok.get_vocab_size(), args.seed, args.seq)
    t1 = time.perf_counter()
    steps, best_t = train("target", target, data, val, args.steps, args, device, args.lr, 0.62 * budget)
    t_target = time.perf_counter() - t1
    draft = make_model(args.size, "draft", tok.get_vocab_size(), args.seed + 1, args.seq)
    t2 = time.perf_counter()
    draft_steps, best_d = train("draft", draft, data, val, args.draft_steps, args, device, 1.5 * args.lr,
                        budget - (t2 - t1) if budget else 0.0, teacher=target)
    t_draft = time.perf_counter() - t2

    m = evaluate(target, draft, held, held_bytes, args, device)
    prompt = "def fib(n):"
    for name, mod in (("target", target), ("draft", draft)):
        print(f"--- {name} sample ---\n{sample(mod, tok, prompt)}", flush=True)
    n_t, n_d = (sum(p.numel() for p in mod.parameters()) for mod in (target, draft))
    for name, mod in (("target", target), ("draft", draft)):
        save(mod, tok, args.out / name)
    sizes = {name: sum(f.stat().st_size for f in (args.out / name).iterdir()) for name in ("target", "draft")}
    tokens = args.batch * args.seq
    summary = {
        "python": sys.version.split()[0], "torch": torch.__version__, "device": str(device),
        "corpus": str(stdlib), "train_files": len(train_texts), "heldout_files": len(heldout_texts),
        "target_best_step": best_t, "draft_best_step": best_d,
        "seed": args.seed, "steps": steps, "draft_steps": draft_steps, "batch": args.batch, "seq": args.seq,
        "train_tokens": len(data), "target_tokens_seen": steps * tokens,
        "draft_tokens_seen": draft_steps * tokens,
        "target_train_s": round(t_target, 1), "draft_train_s": round(t_draft, 1),
        "target_params": n_t, "draft_params": n_d,
        "target_bytes": sizes["target"], "draft_bytes": sizes["draft"],
        **{k: round(v, 4) for k, v in m.items()},
    }
    print("summary " + json.dumps(summary))
    print(f"replay: --seed {args.seed} --steps {steps} --draft-steps {draft_steps} --batch {args.batch} "
          f"--seq {args.seq} --vocab {args.vocab} --lr {args.lr}")
    total = sum(sizes.values())
    print(f"wrote {args.out}: {total / 1e6:.2f} MB in all [{time.perf_counter() - t0:.0f}s]")
    if total > 25e6:
        print("WARNING: over the 25 MB package-data budget", file=sys.stderr)


if __name__ == "__main__":
    main()
